//! `upstream.body_idle_timeout` for responses whose writer is hyper's (h2c): a client that stops
//! reading stops hyper from polling the body, so nothing inside the body could notice. Each
//! connection keeps a list of its bodies still streaming, and its own task sweeps it every
//! quarter of the timeout (no task or timer per response): a body no frame has moved through
//! for the timeout is dropped (resetting the upstream stream and releasing its lease), and the
//! client's stream ends with an error. While the list is empty the task sets no timer for it:
//! the first body to join wakes the task.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
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
    /// When the last body leaves, the slab's storage goes too, so an idle connection keeps none.
    slots: Vec<Option<Arc<Shared>>>,
    free: Vec<usize>,
    /// The connection's task, waiting for a first body to sweep.
    waiter: Option<Waker>,
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
        let waiter = s.waiter.take();
        drop(s);
        if let Some(w) = waiter {
            w.wake();
        }
        Guarded::Watched(shared, index, self.clone())
    }

    /// Whether any body is being watched, i.e. whether the connection must sweep.
    pub fn watching(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).live() > 0
    }

    /// Ready once a body is being watched; until then the task is woken by the first to join.
    pub fn poll_watching(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.live() > 0 {
            return Poll::Ready(());
        }
        if !s.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
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

impl Slots {
    /// Bodies in the list.
    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Guarded::Watched(_, index, watch) = self {
            let mut s = watch.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.live() == 1 {
                s.slots = Vec::new();
                s.free = Vec::new();
            } else {
                s.slots[*index] = None;
                s.free.push(*index);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn body() -> ResponseBody {
        ResponseBody::local(Bytes::from_static(b"x"))
    }

    fn index(g: &Guarded) -> usize {
        match g {
            Guarded::Watched(_, i, _) => *i,
            Guarded::Plain(_) => panic!("not watched"),
        }
    }

    #[test]
    fn the_first_body_wakes_the_sweeper_and_the_last_frees_the_slab() {
        let watch = Watch::default();
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(watch.poll_watching(&mut cx).is_pending());
        assert!(watch.poll_watching(&mut cx).is_pending());
        let a = watch.guard(body());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the waiting task was not woken");
        assert!(watch.watching());
        assert!(watch.poll_watching(&mut cx).is_ready());
        let b = watch.guard(body());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken with nobody waiting");
        assert_eq!((index(&a), index(&b)), (0, 1));
        drop(a);
        assert!(watch.watching());
        let c = watch.guard(body());
        assert_eq!(index(&c), 0, "a free slot was not reused");
        drop(b);
        drop(c);
        assert!(!watch.watching());
        let s = watch.0.lock().unwrap();
        assert_eq!((s.slots.capacity(), s.free.capacity(), s.live()), (0, 0, 0));
    }

    #[test]
    fn a_sweep_cuts_only_bodies_that_did_not_move() {
        let watch = Watch::default();
        let mut stalled = watch.guard(body());
        let waker = Waker::from(Arc::new(Wakes(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        watch.sweep(Duration::from_secs(60));
        assert!(matches!(
            Pin::new(&mut stalled).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        let mut stalled = watch.guard(body());
        watch.sweep(Duration::ZERO);
        assert!(matches!(
            Pin::new(&mut stalled).poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
    }
}
