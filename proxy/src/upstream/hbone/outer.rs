//! The outer HBONE connection: its single-flight dial (TCP, ztunnel's TLS, HTTP/2) and the
//! reading of why such a connection failed.

use super::*;

impl OuterDialer {
    fn lock(&self) -> std::sync::MutexGuard<'_, OuterSlot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outer connection to use for the next CONNECT: the current one, the result of the
    /// dial in progress, the recent failure (for [`FAIL_FAST`]), or a new dial.
    pub(super) async fn get(self: &Arc<Self>) -> Result<OuterView, UpstreamError> {
        let mut outcome = {
            let mut slot = self.lock();
            let now = Instant::now();
            if let Some(o) = &slot.ready {
                if !o.hop.sender.is_closed() && now < o.expires {
                    return Ok(o.view());
                }
                slot.ready = None;
            }
            // A dial task that vanished (it cannot, short of a panic) leaves a closed channel.
            match slot.dialing.clone().filter(|rx| rx.has_changed().is_ok()) {
                Some(rx) => rx,
                None => {
                    if let Some((at, e)) = &slot.failed {
                        if now < *at + FAIL_FAST {
                            return Err(e.clone());
                        }
                    }
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    slot.dialing = Some(rx.clone());
                    tokio::spawn(self.clone().dial_task(tx));
                    rx
                }
            }
        };
        let result = outcome.wait_for(Option::is_some).await;
        match result {
            Ok(r) => r.clone().expect("waited for Some"),
            Err(_) => Err(UpstreamError::Http(format!(
                "HBONE outer connection of {}: the dial was abandoned",
                self.service
            ))),
        }
    }

    /// Runs one dial under the connect and handshake timeouts together, records its outcome
    /// in the slot, then tells the waiters.
    async fn dial_task(self: Arc<Self>, tx: tokio::sync::watch::Sender<Option<Result<OuterView, UpstreamError>>>) {
        let limit = self.settings.connect_timeout + self.settings.handshake_timeout;
        let dialed = match tokio::time::timeout(limit, self.dial()).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::HandshakeTimeout {
                addr: self.target.target().to_string(),
            }),
        };
        let published = {
            let mut slot = self.lock();
            slot.dialing = None;
            match dialed {
                Ok(o) => {
                    let v = o.view();
                    slot.ready = Some(o);
                    slot.failed = None;
                    Ok(v)
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, target = %self.target.target(), error = %e, "HBONE outer connection failed");
                    slot.failed = Some((Instant::now(), e.clone()));
                    Err(e)
                }
            }
        };
        let _ = tx.send(Some(published));
    }

    async fn dial(&self) -> Result<Outer, UpstreamError> {
        // A name is resolved at every dial (outer dials are rare), so DNS changes are picked
        // up; on failure the last good addresses are kept.
        match tokio::time::timeout(self.settings.connect_timeout, self.target.resolve()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %self.service, target = %self.target.target(), error = %e, "resolving the HBONE target failed; keeping the previous addresses");
            }
            Err(_) => {
                tracing::warn!(service = %self.service, target = %self.target.target(), "resolving the HBONE target timed out; keeping the previous addresses");
            }
        }
        let (addr, conn) = connect_via(&self.target, &self.tls, &self.settings, &self.service).await?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        if conn.alpn.as_deref() != Some(b"h2") {
            return Err(UpstreamError::Protocol {
                got: conn
                    .alpn
                    .as_deref()
                    .map_or("no ALPN".into(), |a| String::from_utf8_lossy(a).into_owned()),
                want: "h2 (HBONE)",
            });
        }
        let local = conn.stream.get_ref().0.local_addr().unwrap_or(addr);
        let hop = h2_handshake(conn.stream, addr, &self.service, "outer").await?;
        let age = self
            .settings
            .max_connection_age
            .mul_f64(jitter(self.settings.max_connection_age_jitter));
        Ok(Outer {
            addr,
            local,
            expires: Instant::now() + age,
            hop,
        })
    }
}

/// Why an HBONE HTTP/2 connection failed. In TLS 1.3 the server checks the client certificate
/// after the client considers the handshake done, so a refused certificate (another trust
/// domain, an unknown CA) arrives as an alert on the first read: a TLS failure, not a reset.
/// The alert can be lost: the endpoint closes with our first HTTP/2 bytes unread, its kernel
/// answers them with a reset, and ours then drops the unread alert. A connection that ends
/// before the endpoint sent a single byte after the handshake is therefore a refused handshake
/// too (`heard` false), whatever error text the reset brought.
pub(super) fn connection_failure(
    addr: SocketAddr,
    which: &str,
    e: &dyn std::fmt::Display,
    tls: Option<rustls::Error>,
    heard: bool,
) -> UpstreamError {
    const HINT: &str = "did the endpoint refuse this client certificate, e.g. from another trust domain?";
    match tls {
        Some(tls) => UpstreamError::Tls {
            addr: addr.to_string(),
            reason: format!("HBONE {which} connection: {tls} ({HINT})"),
        },
        None if !heard => UpstreamError::Tls {
            addr: addr.to_string(),
            reason: format!(
                "HBONE {which} connection closed before the endpoint sent anything after the handshake: {e} ({HINT})"
            ),
        },
        None => UpstreamError::Http(format!("HBONE {which} connection to {addr}: {e}")),
    }
}

/// A TLS stream that remembers the TLS error that ended it: h2 keeps only the text of the
/// I/O errors it reports, so the alert would otherwise become a bare "connection error".
struct Watched<T> {
    inner: T,
    tls_error: Arc<std::sync::Mutex<Option<rustls::Error>>>,
    /// Set once the endpoint sent any bytes after the handshake (its HTTP/2 SETTINGS).
    heard: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Watched<T> {
    fn note<R>(&self, r: &std::task::Poll<std::io::Result<R>>) {
        if let std::task::Poll::Ready(Err(e)) = r {
            if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                *self.tls_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        self.note(&r);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&r);
        r
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&r);
        r
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub(super) async fn h2_handshake<T>(
    tls: T,
    addr: SocketAddr,
    service: &str,
    which: &'static str,
) -> Result<Hop, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tls_error = Arc::new(std::sync::Mutex::new(None));
    let heard = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = TokioIo::new(Watched {
        inner: tls,
        tls_error: tls_error.clone(),
        heard: heard.clone(),
    });
    let seen = move || {
        let tls = tls_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        (tls, heard.load(Ordering::Relaxed))
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Pings notice an outer connection silently dropped on the way.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(io)
        .await
        .map_err(|e| {
            let (tls, heard) = seen();
            connection_failure(addr, which, &e, tls, heard)
        })?;
    let service = service.to_string();
    let (tx, ended) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%service, which, error = %e, "HBONE connection ended");
            let (tls, heard) = seen();
            let _ = tx.send(Some(connection_failure(addr, which, &e, tls, heard)));
        }
    });
    Ok(Hop { sender, ended })
}
