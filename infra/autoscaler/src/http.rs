//! The one HTTP client of the autoscaler's own calls (Prometheus API, instances' admin API, EC2
//! DescribeInstances): hyper 1 with rustls on ring and the system's roots, so `https://` works
//! for Prometheus and EC2, and plain HTTP for admin listeners. Every call has a timeout.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Http")
    }
}

impl Http {
    pub fn new() -> Http {
        let provider = || std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider()) {
            Ok(b) => b,
            Err(e) => {
                // A host without CA certificates can still reach plain-HTTP endpoints.
                tracing::warn!(error = %e, "no system CA certificates: https:// endpoints will fail");
                let config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Sends `req` and collects the body, all within `timeout`.
    pub async fn send(&self, req: Request<Full<Bytes>>, timeout: Duration) -> Result<(StatusCode, Bytes), HttpError> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Transport(error_chain(&e)))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(HttpError::Timeout(timeout)))
    }

    pub async fn get(&self, url: &str, timeout: Duration) -> Result<(StatusCode, Bytes), HttpError> {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| HttpError::Transport(format!("bad URL {url:?}: {e}")))?;
        self.send(req, timeout).await
    }
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

/// An error and its sources on one line (hyper's Display alone says only "client error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
