//! The response side of a transcoded call: gRPC frames and trailers from the mesh become one
//! JSON object (unary) or newline-delimited JSON objects (server streaming, sent as they arrive),
//! and a non-OK `grpc-status` becomes its HTTP status with `{"code": N, "message": "..."}`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use crate::upstream::UpstreamBody;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use prost_reflect::{FieldDescriptor, MessageDescriptor};

use super::{error_json, http_status, message, Call, MAX_RESPONSE_MESSAGE};

const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;
const DEADLINE_EXCEEDED: u32 = 4;

/// What the mesh sent next, already converted.
enum Event {
    /// One message as a JSON line.
    Line(Bytes),
    /// The call ended with `grpc-status: 0`.
    Done,
    /// The call failed (its status, or meshgate's reason it cannot be converted).
    Failed(u32, String),
}

/// Reassembles length-prefixed messages from the upstream body and converts each.
struct Stream {
    upstream: UpstreamBody,
    buf: BytesMut,
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
    trailers: Option<HeaderMap>,
}

impl Stream {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            if self.buf.len() >= 5 {
                let compressed = self.buf[0] != 0;
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if compressed {
                    return Poll::Ready(Event::Failed(
                        INTERNAL,
                        "meshgate: the service sent a compressed message, which transcoding does not support".into(),
                    ));
                }
                if len > MAX_RESPONSE_MESSAGE {
                    return Poll::Ready(Event::Failed(
                        INTERNAL,
                        format!("meshgate: response message larger than {MAX_RESPONSE_MESSAGE} bytes"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len);
                    return Poll::Ready(
                        match message::message_to_json(&self.output, self.response_body.as_ref(), &msg) {
                            Ok(mut json) => {
                                json.push(b'\n');
                                Event::Line(Bytes::from(json))
                            }
                            Err(e) => Event::Failed(INTERNAL, format!("meshgate: cannot convert the response: {e}")),
                        },
                    );
                }
            }
            match ready!(Pin::new(&mut self.upstream).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            let (code, msg) = grpc_status(&t);
                            self.trailers = Some(t);
                            if !self.buf.is_empty() {
                                return Poll::Ready(Event::Failed(
                                    INTERNAL,
                                    "meshgate: truncated response message".into(),
                                ));
                            }
                            return Poll::Ready(if code == 0 {
                                Event::Done
                            } else {
                                Event::Failed(code, msg)
                            });
                        }
                    }
                },
                Some(Err(e)) => {
                    return Poll::Ready(Event::Failed(
                        UNAVAILABLE,
                        format!("meshgate: upstream stream failed: {e}"),
                    ))
                }
                None => {
                    return Poll::Ready(Event::Failed(
                        INTERNAL,
                        "meshgate: the service ended the call without a grpc-status".into(),
                    ))
                }
            }
        }
    }

    async fn next(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

/// `grpc-status` and the percent-decoded `grpc-message` (missing status: UNKNOWN).
fn grpc_status(h: &HeaderMap) -> (u32, String) {
    let code = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2);
    let msg = h
        .get("grpc-message")
        .map(|v| super::template::percent_decode(&String::from_utf8_lossy(v.as_bytes()), false, false))
        .unwrap_or_default();
    (code, msg)
}

/// The response body of a transcoded call.
pub struct TranscodedBody {
    inner: Out,
}

enum Out {
    Full(Option<Bytes>),
    Stream {
        stream: Box<Stream>,
        queued: Option<Bytes>,
        finished: bool,
    },
}

impl Body for TranscodedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.inner {
            Out::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Out::Stream {
                stream,
                queued,
                finished,
            } => {
                if let Some(q) = queued.take() {
                    return Poll::Ready(Some(Ok(Frame::data(q))));
                }
                if *finished {
                    return Poll::Ready(None);
                }
                match ready!(stream.poll_event(cx)) {
                    Event::Line(l) => Poll::Ready(Some(Ok(Frame::data(l)))),
                    Event::Done => {
                        *finished = true;
                        Poll::Ready(None)
                    }
                    // The status line is already sent: a failure after it is a last line of its
                    // own, `{"error": {"code": N, "message": "..."}}`.
                    Event::Failed(code, msg) => {
                        *finished = true;
                        let mut line =
                            serde_json::to_vec(&serde_json::json!({ "error": { "code": code, "message": msg } }))
                                .unwrap_or_default();
                        line.push(b'\n');
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Out::Full(b) => b.is_none(),
            Out::Stream { queued, finished, .. } => *finished && queued.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Out::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Out::Stream { .. } => SizeHint::default(),
        }
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    mut headers: HeaderMap,
) -> Response<TranscodedBody> {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let mut resp = Response::new(TranscodedBody {
        inner: Out::Full(Some(body)),
    });
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

fn failed(code: u32, msg: &str, headers: HeaderMap) -> Response<TranscodedBody> {
    full(http_status(code), "application/json", error_json(code, msg), headers)
}

/// Response metadata worth passing on: everything but gRPC's own framing and status fields.
fn metadata(from: &HeaderMap, into: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        if n.starts_with("grpc-")
            || *name == header::CONTENT_TYPE
            || *name == header::CONTENT_LENGTH
            || *name == header::TRAILER
        {
            continue;
        }
        into.append(name.clone(), value.clone());
    }
}

/// Converts the mesh's answer to a transcoded call. A response that is not gRPC at all (a
/// sidecar's own 403, a 503 from the mesh) is handed back to pass through unchanged. Unary
/// calls are read whole (bounded by `deadline`); streaming ones start as soon as the first
/// message (or the end) arrives, so an immediate error still gets its own HTTP status.
pub async fn respond(
    call: Call<'_>,
    resp: Response<UpstreamBody>,
    deadline: tokio::time::Instant,
) -> Result<Response<TranscodedBody>, Response<UpstreamBody>> {
    let grpc = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc || resp.status() != StatusCode::OK {
        return Err(resp);
    }
    let (parts, body) = resp.into_parts();
    let mut headers = HeaderMap::new();
    metadata(&parts.headers, &mut headers);
    // Trailers-only: the call failed, or ended OK with no message (grpc-go's answer for a
    // server stream that sends nothing); either way there is no body to wait for.
    let trailers_only = parts.headers.contains_key("grpc-status");
    if trailers_only {
        let (code, msg) = grpc_status(&parts.headers);
        if code != 0 {
            return Ok(failed(code, &msg, headers));
        }
    }
    let (output, response_body, server_streaming) = call.output();
    let mut stream = Box::new(Stream {
        upstream: body,
        buf: BytesMut::new(),
        output,
        response_body,
        trailers: None,
    });
    let timed_out = || {
        failed(
            DEADLINE_EXCEEDED,
            "meshgate: no complete response from upstream before the deadline",
            HeaderMap::new(),
        )
    };
    let first = if trailers_only {
        Event::Done
    } else {
        let Ok(first) = tokio::time::timeout_at(deadline, stream.next()).await else {
            return Ok(timed_out());
        };
        first
    };
    if server_streaming {
        let queued = match first {
            Event::Failed(code, msg) => return Ok(failed(code, &msg, headers)),
            Event::Done => None,
            Event::Line(l) => Some(l),
        };
        let finished = queued.is_none();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        let mut resp = Response::new(TranscodedBody {
            inner: Out::Stream {
                stream,
                queued,
                finished,
            },
        });
        *resp.headers_mut() = headers;
        return Ok(resp);
    }
    let line = match first {
        Event::Failed(code, msg) => return Ok(failed(code, &msg, headers)),
        Event::Done => {
            return Ok(failed(
                INTERNAL,
                "meshgate: the service sent no response message for a unary call",
                headers,
            ))
        }
        Event::Line(l) => l,
    };
    let Ok(end) = tokio::time::timeout_at(deadline, stream.next()).await else {
        return Ok(timed_out());
    };
    if let Some(t) = &stream.trailers {
        metadata(t, &mut headers);
    }
    Ok(match end {
        Event::Done => full(StatusCode::OK, "application/json", line, headers),
        Event::Failed(code, msg) => failed(code, &msg, headers),
        Event::Line(_) => failed(
            INTERNAL,
            "meshgate: the service sent more than one response message for a unary call",
            headers,
        ),
    })
}
