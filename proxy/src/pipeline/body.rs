//! The bodies on both sides of a forwarded request: the client's request body on its way to the
//! mesh (counted and held to the size limit), and the response body on its way back, which holds
//! the upstream lease and writes the access log when it ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::log::AccessLog;
use crate::error::ProxyError;
use crate::upstream::{BoxError, Lease, UpstreamBody};

/// Request body towards the mesh, counting bytes as they stream.
pub(super) struct CountingBody<B> {
    pub inner: B,
    pub counter: Arc<AtomicU64>,
    /// Body size limit; going past it fails the body (and so the upstream request).
    pub limit: Option<u64>,
    pub exceeded: Arc<AtomicBool>,
    pub client_error: Arc<AtomicBool>,
}

/// A request body went past `limits.max_request_body` (413): raised here, and by a listener's
/// codec that sees a declared chunk size go past it before the data arrives.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct RequestTooLarge;

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let p = Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::<BoxError>::into)));
        if let Poll::Ready(Some(Err(e))) = &p {
            if e.is::<RequestTooLarge>() {
                self.exceeded.store(true, Ordering::SeqCst);
            } else {
                // The client's own framing broke (bad chunk size, early close): its fault, not
                // the mesh's, whatever error the upstream request then reports.
                self.client_error.store(true, Ordering::SeqCst);
            }
        }
        if let Poll::Ready(Some(Ok(f))) = &p {
            if let Some(d) = f.data_ref() {
                let total = self.counter.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                if self.limit.is_some_and(|l| total > l) {
                    self.exceeded.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(Box::new(RequestTooLarge))));
                }
            }
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(super) enum Inner {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
    Transcoded(crate::transcode::TranscodedBody),
}

/// Response body towards the VM. Holds the upstream lease until the body ends, so pool stream
/// accounting matches what is really in flight, and writes the access log at the end.
pub struct ResponseBody {
    pub(super) inner: Inner,
    pub(super) lease: Option<Lease>,
    pub(super) log: Option<Box<AccessLog>>,
}

impl ResponseBody {
    pub(crate) fn local(b: Bytes) -> Self {
        ResponseBody {
            inner: Inner::Local(Some(b)),
            lease: None,
            log: None,
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(lease) = self.lease.as_mut() {
            if completed {
                lease.body_finished();
            }
        }
        self.lease = None;
        if let Some(log) = self.log.take() {
            log.finish(completed);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let p = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Inner::Transcoded(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(|e| match e {}))),
        };
        match &p {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(log)) = (f.data_ref(), this.log.as_mut()) {
                    log.bytes_out += d.len() as u64;
                }
                // The server stops polling once `is_end_stream` says so, so the end may never be
                // seen as `Ready(None)`: settle the lease and log here.
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_none(),
            Inner::Transcoded(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Transcoded(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A refusal or failure as the client sees it: the status, and a one-line reason.
pub(super) fn local_response(e: &ProxyError) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(Bytes::from(e.body())));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let ProxyError::RateLimited { retry_after_secs } = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    if e.status() == StatusCode::UNAUTHORIZED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meshgate\""),
        );
    }
    resp
}
