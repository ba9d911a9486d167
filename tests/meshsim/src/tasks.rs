//! Task ownership: every task meshsim spawns belongs to something that aborts it when dropped,
//! so dropping a [`crate::Mesh`] (or stopping one listener) leaves nothing running.
//!
//! - [`Service`]: one accept loop; its connection tasks live in a `JoinSet` inside the loop, so
//!   stopping or dropping the loop ends every connection it accepted.
//! - [`OwnedExecutor`]: hyper's HTTP/2 server spawns one task per stream; this executor puts them
//!   in a `JoinSet` owned by the connection instead of detaching them with `tokio::spawn`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// How long a graceful stop may take before the loop is aborted outright.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running accept loop. Dropping it aborts the loop and, with it, all its connections.
#[derive(Debug)]
pub(crate) struct Service {
    handle: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Service {
    /// Accepts connections on `listener` and runs `handler` for each, until stopped.
    pub(crate) fn spawn<F, Fut>(listener: TcpListener, handler: F) -> Service
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    // A dropped sender also ends the loop.
                    _ = &mut stop_rx => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            conns.spawn(handler(stream, peer));
                        }
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
            // Refuse new connections first, then end the existing ones.
            drop(listener);
            conns.shutdown().await;
        });
        Service {
            handle: Some(handle),
            stop: Some(stop_tx),
        }
    }

    /// Stops accepting, closes every connection, and waits until the listener socket is closed.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut handle) = self.handle.take() {
            if tokio::time::timeout(STOP_GRACE, &mut handle).await.is_err() {
                handle.abort();
                let _ = handle.await;
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// A hyper executor whose tasks are aborted when the last clone is dropped (that is, when the
/// connection that owns it ends).
#[derive(Clone, Default)]
pub(crate) struct OwnedExecutor(Arc<Mutex<JoinSet<()>>>);

impl<F> hyper::rt::Executor<F> for OwnedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished tasks so a long-lived connection does not accumulate them.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            fut.await;
        });
    }
}
