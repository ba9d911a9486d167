//! Every way a request can be refused or fail, by blame, mapped once to an HTTP status, a metric
//! `reason` label (a fixed set, never request data) and a one-line body `meshgate: <reason>`.

use http::StatusCode;

use crate::policy::keys::KeyError;
use crate::policy::Deny;
use crate::route::RouteError;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we cannot interpret.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Policy(#[from] Deny),
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("rate limit exceeded for tenant")]
    RateLimited { retry_after_secs: u64 },
    #[error("too many concurrent requests for tenant")]
    ConcurrencyLimited,
    #[error("request body larger than the limit")]
    BodyTooLarge,
    /// The request head is larger than `limits.max_header_bytes` or has more than
    /// `limits.max_headers` fields.
    #[error("{0}")]
    HeadTooLarge(&'static str),
    /// The request head was not complete within `limits.header_read_timeout`.
    #[error("request head not received in time")]
    HeadTimeout,
    /// A transfer coding meshgate does not implement.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// `CONNECT` to an HTTP service: its requests must go through meshgate as requests (so the
    /// header rules apply), never inside an opaque tunnel.
    #[error("CONNECT reaches tcp services only; send requests for this HTTP service as plain HTTP (HTTP_PROXY, not HTTPS_PROXY)")]
    ConnectToHttpService,
    /// The request body did not arrive within the request's deadline (read whole before
    /// forwarding, as a transcoded request's is).
    #[error("request body not received in time")]
    BodyTimeout,
    /// A REST request for a transcoded gRPC method that cannot become its request message.
    #[error("{0}")]
    Transcode(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(_) | ProxyError::Route(RouteError::Malformed) | ProxyError::Transcode(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Key(_) | ProxyError::Policy(Deny::BadKey) => StatusCode::UNAUTHORIZED,
            ProxyError::Policy(_) | ProxyError::ConnectToHttpService => StatusCode::FORBIDDEN,
            ProxyError::Route(RouteError::UnknownHost) => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } | ProxyError::ConcurrencyLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout | ProxyError::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::Upstream(u) => match u {
                UpstreamError::Unresolved(_)
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::PoolTimeout(_)
                | UpstreamError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamError::Tls { .. }
                | UpstreamError::GatewayClosed { .. }
                | UpstreamError::UnknownMeshService { .. }
                | UpstreamError::Identity { .. }
                | UpstreamError::Protocol { .. }
                | UpstreamError::Hbone { .. }
                | UpstreamError::Http(_) => StatusCode::BAD_GATEWAY,
                UpstreamError::HandshakeTimeout { .. } | UpstreamError::RequestTimeout(_) => {
                    StatusCode::GATEWAY_TIMEOUT
                }
            },
        }
    }

    /// The gRPC status code for a refusal of a gRPC request (the codes Envoy and grpc-go use
    /// for the same HTTP statuses, finer where the reason says more).
    pub fn grpc_status(&self) -> u32 {
        const INVALID_ARGUMENT: u32 = 3;
        const DEADLINE_EXCEEDED: u32 = 4;
        const PERMISSION_DENIED: u32 = 7;
        const RESOURCE_EXHAUSTED: u32 = 8;
        const UNIMPLEMENTED: u32 = 12;
        const UNAVAILABLE: u32 = 14;
        const UNAUTHENTICATED: u32 = 16;
        match self.status() {
            StatusCode::BAD_REQUEST => INVALID_ARGUMENT,
            StatusCode::UNAUTHORIZED => UNAUTHENTICATED,
            StatusCode::FORBIDDEN => PERMISSION_DENIED,
            StatusCode::NOT_FOUND | StatusCode::NOT_IMPLEMENTED => UNIMPLEMENTED,
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => RESOURCE_EXHAUSTED,
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => DEADLINE_EXCEEDED,
            _ => UNAVAILABLE,
        }
    }

    /// The metric and access-log label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Malformed(_) | ProxyError::Route(RouteError::Malformed) | ProxyError::Transcode(_) => {
                "malformed_request"
            }
            ProxyError::Key(_) | ProxyError::Policy(Deny::BadKey) => "bad_key",
            ProxyError::Policy(Deny::UnknownClient) => "unknown_client",
            ProxyError::Policy(Deny::KeyWrongSource) => "key_wrong_source",
            ProxyError::Policy(Deny::ServiceNotAllowed) => "service_not_allowed",
            ProxyError::Route(RouteError::UnknownHost) => "unknown_host",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::ConcurrencyLimited => "concurrency_limited",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::HeadTooLarge(_) => "header_too_large",
            ProxyError::HeadTimeout => "header_timeout",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::ConnectToHttpService => "connect_not_tcp",
            ProxyError::Upstream(u) => match u {
                UpstreamError::Unresolved(_) => "gateway_unresolved",
                UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => "gateway_unreachable",
                UpstreamError::Tls { .. } | UpstreamError::GatewayClosed { .. } => "upstream_tls",
                UpstreamError::UnknownMeshService { .. } => "unknown_mesh_service",
                UpstreamError::Identity { .. } => "upstream_identity",
                UpstreamError::HandshakeTimeout { .. } => "upstream_handshake_timeout",
                UpstreamError::Protocol { .. } => "upstream_protocol",
                UpstreamError::RequestTimeout(_) => "upstream_timeout",
                UpstreamError::Http(_) => "upstream_reset",
                UpstreamError::PoolTimeout(_) => "upstream_pool_timeout",
                UpstreamError::Overloaded => "upstream_overloaded",
                UpstreamError::Hbone { .. } => "upstream_hbone",
            },
        }
    }

    /// The response body: one line. Upstream details (addresses, certificate names) help the
    /// operator and reveal nothing a VM could not learn from the mesh itself.
    pub fn body(&self) -> String {
        let mut msg = self.to_string().replace(['\r', '\n'], " ");
        msg.truncate(400);
        format!("meshgate: {msg}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_by_blame() {
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::Policy(Deny::UnknownClient), 403, "unknown_client"),
            (ProxyError::Policy(Deny::BadKey), 401, "bad_key"),
            (ProxyError::Key(KeyError::Malformed), 401, "bad_key"),
            (ProxyError::Policy(Deny::ServiceNotAllowed), 403, "service_not_allowed"),
            (ProxyError::Route(RouteError::UnknownHost), 404, "unknown_host"),
            (ProxyError::Malformed("missing Host"), 400, "malformed_request"),
            (ProxyError::BodyTimeout, 408, "body_timeout"),
            (
                ProxyError::Upstream(UpstreamError::Connect {
                    addr: "a".into(),
                    reason: "refused".into(),
                }),
                503,
                "gateway_unreachable",
            ),
            (
                ProxyError::Upstream(UpstreamError::Identity { reason: "x".into() }),
                502,
                "upstream_identity",
            ),
            (
                ProxyError::Upstream(UpstreamError::RequestTimeout(std::time::Duration::from_secs(1))),
                504,
                "upstream_timeout",
            ),
        ];
        assert_eq!(ProxyError::Policy(Deny::UnknownClient).grpc_status(), 7);
        assert_eq!(ProxyError::Policy(Deny::BadKey).grpc_status(), 16);
        assert_eq!(ProxyError::Route(RouteError::UnknownHost).grpc_status(), 12);
        assert_eq!(ProxyError::RateLimited { retry_after_secs: 1 }.grpc_status(), 8);
        assert_eq!(
            ProxyError::Upstream(UpstreamError::RequestTimeout(std::time::Duration::from_secs(1))).grpc_status(),
            4
        );
        assert_eq!(ProxyError::Upstream(UpstreamError::Overloaded).grpc_status(), 14);
        for (e, status, reason) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.reason(), reason);
            assert!(e.body().starts_with("meshgate: "));
            assert_eq!(e.body().matches('\n').count(), 1);
        }
    }
}
