//! The HTTP/3 listener: QUIC (quinn) with the listener's TLS certificate, HTTP/3 (h3).
//!
//! Each request goes to the same pipeline as the HTTP listener's (`pipeline::handle`), with its
//! body fed from the HTTP/3 stream, so routing, tenant policy (source address, API key header),
//! limits, metrics and access logs are the very same code, not a second implementation that
//! could drift.
//!
//! Closing (drain, or the listener removed by a reload): stop accepting; each connection gets
//! an HTTP/3 GOAWAY at a random moment within the spread; whatever is left is cut at the deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{finish, told_to_close, Admission, PrefaceSlot};
use crate::config::{Limits, ListenerTls};
use crate::lifecycle::CloseSignal;
use crate::pipeline::{self, ConnInfo};
use crate::runtime::Runtime;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body fed from the HTTP/3 stream by a pump task.
struct ChannelBody {
    rx: mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx)
    }
}

/// Address validation (Retry) is asked for once more than this fraction of the preface slots
/// hold handshakes or connections without a request yet.
const RETRY_ABOVE_DIVISOR: usize = 8;

/// The QUIC server configuration: TLS 1.3 (QUIC has no other), ALPN `h3`, stream limits from
/// `limits`.
pub fn server_config(tls: &ListenerTls, limits: &Limits) -> Result<quinn::ServerConfig, String> {
    let (chain, key) = tls.certified_key()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", tls.cert_chain.display()))?;
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    crypto.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(limits.h2_max_concurrent_streams))
        // A silent peer is gone after the idle timeout; meshgate sends no keep-alives of its
        // own, so it never keeps an idle connection alive itself.
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout.max(Duration::from_secs(1)))
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))),
        ))
        .keep_alive_interval(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Serves `socket` until told to close.
pub async fn serve(socket: std::net::UdpSocket, name: Arc<str>, runtime: Arc<Runtime>, mut close: CloseSignal) {
    let gen = runtime.current();
    let Some(mut tls) = gen.listener(&name).and_then(|l| l.tls.clone()) else {
        tracing::error!(listener = %name, "h3 listener without tls; not serving");
        return;
    };
    let config = match server_config(&tls, &gen.snapshot.limits) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(listener = %name, error = %e, "h3 listener: bad TLS settings; not serving");
            return;
        }
    };
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(listener = %name, error = %e, "h3 listener: cannot start QUIC");
            return;
        }
    };
    let admission = Admission::new(runtime.clone(), name.clone());
    let mut conns = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break tokio::time::Instant::now() };
                let gen = runtime.current();
                // A reload that changed the certificate applies to new connections.
                if let Some(new) = gen.listener(&name).and_then(|l| l.tls.as_ref()) {
                    // Pointer first: the contents are compared only after a reload re-read them.
                    let same = Arc::ptr_eq(&new.chain_pem, &tls.chain_pem) && Arc::ptr_eq(&new.key_pem, &tls.key_pem);
                    if !same && *new != tls {
                        match server_config(new, &gen.snapshot.limits) {
                            Ok(c) => {
                                endpoint.set_server_config(Some(c));
                                tls = new.clone();
                                tracing::info!(listener = %name, "h3 listener certificate replaced");
                            }
                            Err(e) => tracing::error!(listener = %name, error = %e, "new h3 certificate unusable; keeping the old one"),
                        }
                    } else if !same {
                        // Same files re-read by a reload: remember these so the next check is cheap.
                        tls = new.clone();
                    }
                }
                // A handshake in progress takes a preface slot, not a connection slot: a flood
                // of handshakes that never finish cannot lock TCP clients out.
                let preface = admission.admit_preface(&gen);
                // Under load, make clients prove their address first (a Retry round trip) before
                // any handshake work: spoofed floods then cost one packet each.
                let handshaking = runtime.prefaces.len();
                if !incoming.remote_address_validated()
                    && incoming.may_retry()
                    && handshaking > gen.snapshot.limits.max_preface_connections / RETRY_ABOVE_DIVISOR
                {
                    let _ = incoming.retry();
                    continue;
                }
                let limits = gen.snapshot.limits.clone();
                conns.spawn(connection(runtime.clone(), admission.clone(), incoming, preface, close.clone(), limits));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            deadline = told_to_close(&mut close) => break deadline,
        }
    };
    // No new connections; existing ones finish or are cut at the deadline.
    endpoint.set_server_config(None);
    finish(&name, conns, deadline).await;
    endpoint.close(quinn::VarInt::from_u32(0x100), b"closing"); // H3_NO_ERROR
}

async fn connection(
    runtime: Arc<Runtime>,
    admission: Admission,
    incoming: quinn::Incoming,
    preface: PrefaceSlot,
    mut close: CloseSignal,
    limits: Limits,
) {
    let accepted = tokio::time::Instant::now();
    let peer = incoming.remote_address();
    let evicted = preface.evicted();
    let handshake = tokio::select! {
        h = tokio::time::timeout(limits.header_read_timeout, incoming) => h,
        _ = evicted => {
            tracing::debug!(client = %peer, "QUIC handshake evicted for a newer connection");
            return;
        }
    };
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "QUIC handshake timed out");
            return;
        }
    };
    // Now a connection: counted against the connection limits (its address is validated).
    let gen = runtime.current();
    let Some(mut guard) = admission.admit(&gen) else {
        conn.close(quinn::VarInt::from_u32(0x101), b"connection limit"); // H3_GENERAL_PROTOCOL_ERROR
        return;
    };
    if !admission.admit_source(&gen, &mut guard, peer.ip()) {
        conn.close(quinn::VarInt::from_u32(0x101), b"connection limit");
        return;
    }
    drop(gen);
    let guard = Arc::new(guard);
    let name = admission.name.clone();
    let mut info = ConnInfo::new(name.clone(), peer, None);
    info.lifetime = Some(guard.clone());
    info.close = Some(close.clone());
    info.is_h2.store(true, Ordering::Relaxed);
    info.scheme = "https";
    *info.preface.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(preface));
    let info = Arc::new(info);

    let mut h3 = match h3::server::builder()
        .max_field_section_size(limits.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "HTTP/3 connection setup failed");
            return;
        }
    };
    let mut requests = JoinSet::new();
    let asked = crate::lifecycle::closing_spread(&mut close);
    tokio::pin!(asked);
    let mut deadline: Option<tokio::time::Instant> = None;
    let head_timeout = limits.header_read_timeout;
    let first_due = accepted + limits.header_read_timeout;
    loop {
        // After our GOAWAY, h3 only ends `accept` once the client says goodbye too: stop as
        // soon as the requests in flight are done instead of waiting for that.
        if deadline.is_some() && requests.is_empty() {
            break;
        }
        // No request by the first head's deadline, or none in flight for the idle timeout:
        // close (a client's QUIC pings do not keep a connection that carries nothing).
        let idle_check = if info.requests.load(Ordering::Relaxed) == 0 {
            first_due
        } else {
            crate::lifecycle::instant_of(info.last_done.load(Ordering::Relaxed)) + limits.idle_timeout
        };
        tokio::select! {
            _ = tokio::time::sleep_until(idle_check), if deadline.is_none() && requests.is_empty() => {
                let idle = info.in_flight.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= idle_check;
                if idle {
                    tracing::debug!(client = %peer, "closing an idle HTTP/3 connection");
                    break;
                }
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let (runtime, info) = (runtime.clone(), info.clone());
                    requests.spawn(async move {
                        // A stream that never sends its HEADERS must not hold a slot forever.
                        match tokio::time::timeout(head_timeout, resolver.resolve_request()).await {
                            Ok(Ok((req, stream))) => request(runtime, info, req, stream).await,
                            Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "bad HTTP/3 request head"),
                            Err(_) => tracing::debug!(client = %peer, "HTTP/3 request head not received in time"),
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(client = %peer, error = %e, "HTTP/3 connection ended");
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            d = &mut asked, if deadline.is_none() => {
                info.closing.store(true, Ordering::SeqCst);
                deadline = Some(d);
                // GOAWAY: no new requests; those in flight finish.
                if let Err(e) = h3.shutdown(0).await {
                    tracing::debug!(client = %peer, error = %e, "HTTP/3 GOAWAY failed");
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    // Requests still running finish unless the connection is gone (nobody to answer) or the
    // drain deadline passes; then they are cut, releasing their upstream streams and slots.
    let all_done = async { while requests.join_next().await.is_some() {} };
    let cut = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = all_done => {}
        _ = conn.closed() => {}
        _ = cut => {}
    }
    requests.shutdown().await;
    conn.close(quinn::VarInt::from_u32(0x100), b""); // H3_NO_ERROR
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Headers HTTP/3 forbids (RFC 9114 §4.2): connection-specific ones.
const CONNECTION_SPECIFIC: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::HeaderName::from_static("keep-alive"),
    http::header::HeaderName::from_static("proxy-connection"),
];

/// One HTTP/3 request through the pipeline. A failure before the response head is answered
/// 502; after it, the stream is reset, so a cut body never looks complete to the client.
async fn request<S>(
    runtime: Arc<Runtime>,
    info: Arc<ConnInfo>,
    req: Request<()>,
    stream: h3::server::RequestStream<S, Bytes>,
) where
    S: h3::quic::BidiStream<Bytes> + Send + 'static,
    S::SendStream: Send,
    S::RecvStream: Send + 'static,
{
    let peer = info.client;
    let (mut send, recv) = stream.split();
    let mut head_sent = false;
    if let Err(e) = relay::<S>(runtime, info, req, &mut send, recv, &mut head_sent).await {
        tracing::debug!(client = %peer, error = %e, "HTTP/3 request ended with error");
        if head_sent {
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
        } else {
            let resp = Response::builder()
                .status(http::StatusCode::BAD_GATEWAY)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(())
                .expect("static response");
            let answered = async {
                send.send_response(resp).await?;
                send.send_data(Bytes::from_static(b"meshgate: HTTP/3 request failed\n"))
                    .await?;
                send.finish().await
            };
            if answered.await.is_err() {
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
            }
        }
    }
}

async fn relay<S>(
    runtime: Arc<Runtime>,
    info: Arc<ConnInfo>,
    req: Request<()>,
    send: &mut h3::server::RequestStream<S::SendStream, Bytes>,
    mut recv: h3::server::RequestStream<S::RecvStream, Bytes>,
    head_sent: &mut bool,
) -> Result<(), BoxError>
where
    S: h3::quic::BidiStream<Bytes> + Send + 'static,
    S::SendStream: Send,
    S::RecvStream: Send + 'static,
{
    if req.method() == http::Method::CONNECT {
        // Tunnels need the stream itself as a byte pipe, which is not wired up for HTTP/3.
        let resp = Response::builder()
            .status(http::StatusCode::NOT_IMPLEMENTED)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(())
            .expect("static response");
        send.send_response(resp).await?;
        send.send_data(Bytes::from_static(
            b"CONNECT over HTTP/3 is not supported; use the HTTP listener\n",
        ))
        .await?;
        *head_sent = true;
        send.finish().await?;
        return Ok(());
    }
    let (tx, rx) = mpsc::channel(4);
    // The request body, read as the handler consumes it (the channel bounds what is buffered).
    let pump = tokio::spawn(async move {
        loop {
            match recv.recv_data().await {
                Ok(Some(mut chunk)) => {
                    let data = chunk.copy_to_bytes(chunk.remaining());
                    if tx.send(Ok(http_body::Frame::data(data))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as BoxError)).await;
                    return;
                }
            }
        }
        match recv.recv_trailers().await {
            Ok(Some(t)) => {
                let _ = tx.send(Ok(http_body::Frame::trailers(t))).await;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(Err(Box::new(e) as BoxError)).await;
            }
        }
    });
    let _pump = AbortOnDrop(pump);
    let (mut parts, ()) = req.into_parts();
    for h in &CONNECTION_SPECIFIC {
        parts.headers.remove(h);
    }
    // HTTP/2 allows `te` only as `trailers` (what gRPC sends); anything else is dropped.
    if parts.headers.get(http::header::TE).is_some_and(|v| v != "trailers") {
        parts.headers.remove(http::header::TE);
    }
    let req = Request::from_parts(parts, ChannelBody { rx });
    let resp = pipeline::handle(runtime.current(), info, req, None).await;
    let (mut parts, mut body) = resp.into_parts();
    for h in &CONNECTION_SPECIFIC {
        parts.headers.remove(h);
    }
    parts.version = http::Version::HTTP_3;
    send.send_response(Response::from_parts(parts, ())).await?;
    *head_sent = true;
    // No frame from the mesh, or none the client takes, within the body idle timeout: cut.
    let idle = runtime.current().snapshot.upstream.body_idle_timeout;
    let stalled = || -> BoxError { "response body made no progress within upstream.body_idle_timeout".into() };
    while let Some(frame) = tokio::time::timeout(idle, body.frame()).await.map_err(|_| stalled())? {
        let frame = frame?;
        match frame.into_data() {
            Ok(d) => tokio::time::timeout(idle, send.send_data(d))
                .await
                .map_err(|_| stalled())??,
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    send.send_trailers(t).await?;
                    break;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}
