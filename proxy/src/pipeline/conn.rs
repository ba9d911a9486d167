//! What the pipeline knows of the client connection a request came on, shared with the
//! listener that owns it (drain, idle and preface bookkeeping).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

use http::HeaderValue;

/// Facts about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    /// The client: the TCP peer, or the source a trusted load balancer's PROXY header names.
    pub client: SocketAddr,
    /// The AWS VPC endpoint from a PROXY v2 header, if any.
    pub vpce: Option<String>,
    /// Set when the listener drains: HTTP/1.1 responses then carry `Connection: close`, so the
    /// client closes after a complete response instead of racing a close of an idle connection.
    pub closing: AtomicBool,
    /// Requests seen, and whether they came as HTTP/2 (which drains with GOAWAY instead).
    pub requests: AtomicU64,
    pub is_h2: AtomicBool,
    /// Requests whose response has not ended, and when the last one ended (ms on
    /// [`crate::lifecycle::millis`]): how multiplexed listeners (h2c, HTTP/3) tell an idle
    /// connection.
    pub in_flight: AtomicUsize,
    pub last_done: AtomicU64,
    /// Held until the connection's first request: its place among the connections still in
    /// their preface (`limits.max_preface_connections`).
    pub preface: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Keeps the connection counted (limits, gauges) while a tunnel it became outlives the
    /// connection's own task; and the listener's close signal, so drains cut tunnels too.
    pub lifetime: Option<Arc<dyn std::any::Any + Send + Sync>>,
    pub close: Option<crate::lifecycle::CloseSignal>,
    /// `X-Forwarded-Proto` for the mesh: `http`, or `https` on the h3 (TLS) listener.
    pub scheme: &'static str,
    /// The client's address as `X-Forwarded-For` names it (IPv4 clients of a dual-stack
    /// listener as IPv4), made once per connection.
    pub client_ip: HeaderValue,
}

impl ConnInfo {
    pub fn new(listener: Arc<str>, client: SocketAddr, vpce: Option<String>) -> ConnInfo {
        ConnInfo {
            listener,
            client,
            vpce,
            closing: Default::default(),
            requests: AtomicU64::new(0),
            is_h2: Default::default(),
            in_flight: AtomicUsize::new(0),
            last_done: AtomicU64::new(crate::lifecycle::millis()),
            preface: Default::default(),
            lifetime: None,
            scheme: "http",
            close: None,
            client_ip: HeaderValue::from_str(&client.ip().to_canonical().to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}
