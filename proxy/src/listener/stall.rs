//! `upstream.body_idle_timeout` for responses whose writer is hyper's (h2c): a client that stops
//! reading stops hyper from polling the body, so nothing inside the body could notice. A
//! watchdog task, started only for a body still streaming when its head goes out, drops the
//! body (resetting the upstream stream and releasing its lease) once no frame has moved for
//! the timeout; the client's stream then ends with an error.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::pipeline::ResponseBody;
use crate::upstream::BoxError;

pub(super) struct Shared {
    body: Mutex<Option<ResponseBody>>,
    /// When a frame last moved (ms on `lifecycle::millis`).
    last: AtomicU64,
}

pub enum Guarded {
    /// Already complete (or nothing to watch): no watchdog.
    Plain(ResponseBody),
    Watched(Arc<Shared>),
}

/// Wraps `body`, watching it if it is still streaming.
pub fn guard(body: ResponseBody, idle: Duration) -> Guarded {
    if body.is_end_stream() {
        return Guarded::Plain(body);
    }
    let shared = Arc::new(Shared {
        body: Mutex::new(Some(body)),
        last: AtomicU64::new(crate::lifecycle::millis()),
    });
    let watch = Arc::downgrade(&shared);
    tokio::spawn(async move {
        let mut wait = idle;
        loop {
            tokio::time::sleep(wait).await;
            let Some(s) = watch.upgrade() else { return };
            let quiet = crate::lifecycle::millis().saturating_sub(s.last.load(Ordering::Relaxed));
            let quiet = Duration::from_millis(quiet);
            if quiet >= idle {
                let stalled = s.body.lock().unwrap_or_else(|e| e.into_inner()).take();
                if stalled.is_some() {
                    tracing::debug!(?idle, "response body made no progress; resetting it");
                }
                return;
            }
            wait = idle - quiet;
        }
    });
    Guarded::Watched(shared)
}

#[derive(Debug, thiserror::Error)]
#[error("response body made no progress within upstream.body_idle_timeout")]
struct Stalled;

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Guarded::Plain(b) => Pin::new(b).poll_frame(cx),
            Guarded::Watched(s) => {
                let mut body = s.body.lock().unwrap_or_else(|e| e.into_inner());
                let Some(b) = body.as_mut() else {
                    return Poll::Ready(Some(Err(Box::new(Stalled))));
                };
                let p = Pin::new(b).poll_frame(cx);
                if p.is_ready() {
                    s.last.store(crate::lifecycle::millis(), Ordering::Relaxed);
                }
                p
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Guarded::Plain(b) => b.is_end_stream(),
            Guarded::Watched(s) => s
                .body
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Guarded::Plain(b) => b.size_hint(),
            Guarded::Watched(s) => s
                .body
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or_else(SizeHint::default, |b| b.size_hint()),
        }
    }
}
