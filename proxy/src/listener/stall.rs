//! `upstream.body_idle_timeout` for responses whose writer is hyper's (h2c): a client that stops
//! reading stops hyper from polling the body, so nothing inside the body could notice. Each
//! connection keeps a list of its bodies still streaming, and its own task sweeps it every
//! quarter of the timeout (no task or timer per response): a body no frame has moved through
//! for the timeout is dropped (resetting the upstream stream and releasing its lease), and the
//! client's stream ends with an error.

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
    /// Already complete (or nothing to watch).
    Plain(ResponseBody),
    /// Watched: its place in the connection's list, given back when it is dropped.
    Watched(Arc<Shared>, usize, Watch),
}

/// The streaming response bodies of one connection: a slab of slots, so registering and
/// leaving cost a lock and an index, and the list never holds finished bodies.
#[derive(Clone, Default)]
pub struct Watch(Arc<Mutex<Slots>>);

#[derive(Default)]
struct Slots {
    slots: Vec<Option<Arc<Shared>>>,
    free: Vec<usize>,
}

impl Watch {
    /// Wraps `body`, watching it if it is still streaming.
    pub fn guard(&self, body: ResponseBody) -> Guarded {
        if body.is_end_stream() {
            return Guarded::Plain(body);
        }
        let shared = Arc::new(Shared {
            body: Mutex::new(Some(body)),
            last: AtomicU64::new(crate::lifecycle::millis()),
        });
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let index = match s.free.pop() {
            Some(i) => {
                s.slots[i] = Some(shared.clone());
                i
            }
            None => {
                s.slots.push(Some(shared.clone()));
                s.slots.len() - 1
            }
        };
        drop(s);
        Guarded::Watched(shared, index, self.clone())
    }

    /// Drops the bodies nothing has moved through for `idle`.
    pub fn sweep(&self, idle: Duration) {
        let now = crate::lifecycle::millis();
        let idle_ms = idle.as_millis() as u64;
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for shared in s.slots.iter().flatten() {
            if now.saturating_sub(shared.last.load(Ordering::Relaxed)) >= idle_ms {
                let stalled = shared.body.lock().unwrap_or_else(|e| e.into_inner()).take();
                if stalled.is_some() {
                    tracing::debug!(?idle, "response body made no progress; resetting it");
                }
            }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Guarded::Watched(_, index, watch) = self {
            let mut s = watch.0.lock().unwrap_or_else(|e| e.into_inner());
            s.slots[*index] = None;
            s.free.push(*index);
        }
    }
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
            Guarded::Watched(s, _, _) => {
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
            Guarded::Watched(s, _, _) => s
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
            Guarded::Watched(s, _, _) => s
                .body
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or_else(SizeHint::default, |b| b.size_hint()),
        }
    }
}
