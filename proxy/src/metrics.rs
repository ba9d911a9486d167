//! Every metric meshgate exports, in one place. The names are a contract with `dashboards/` and
//! the autoscaler. Label values come only from config names (listener, tenant, service) and
//! fixed sets (reason, code, direction), never from request data, so cardinality is bounded by
//! the config.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    pub tenant: String,
    pub service: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub service: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub direction: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub denied: Family<DeniedLabels, Counter>,
    pub upstream_errors: Family<ServiceReasonLabels, Counter>,
    pub request_duration: Family<ServiceLabels, Histogram>,
    pub requests_in_flight: Gauge,
    pub bytes: Family<BytesLabels, Counter>,
}

/// Reasons that are the client's or policy's doing, as opposed to upstream failures.
fn is_denial(reason: &str) -> bool {
    matches!(
        reason,
        "unknown_client"
            | "bad_key"
            | "key_wrong_source"
            | "service_not_allowed"
            | "unknown_host"
            | "malformed_request"
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let denied = Family::<DeniedLabels, Counter>::default();
        let upstream_errors = Family::<ServiceReasonLabels, Counter>::default();
        let request_duration = Family::<ServiceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let requests_in_flight = Gauge::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "meshgate_requests",
            "Requests handled, by listener, tenant, service and status code",
            requests.clone(),
        );
        registry.register(
            "meshgate_denied",
            "Requests refused by meshgate before reaching the mesh, by reason",
            denied.clone(),
        );
        registry.register(
            "meshgate_upstream_errors",
            "Requests that failed on the way into the mesh, by service and reason",
            upstream_errors.clone(),
        );
        registry.register(
            "meshgate_request_duration_seconds",
            "Time from request received to response body finished",
            request_duration.clone(),
        );
        registry.register(
            "meshgate_requests_in_flight",
            "Requests currently being handled",
            requests_in_flight.clone(),
        );
        registry.register(
            "meshgate_bytes",
            "Body bytes carried, by service and direction (upstream = VM to mesh)",
            bytes.clone(),
        );
        Metrics {
            registry,
            requests,
            denied,
            upstream_errors,
            request_duration,
            requests_in_flight,
            bytes,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_request(
        &self,
        listener: &str,
        tenant: Option<&str>,
        service: Option<&str>,
        status: u16,
        reason: &str,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let service = service.unwrap_or("none");
        self.requests
            .get_or_create(&RequestLabels {
                listener: listener.to_string(),
                tenant: tenant.unwrap_or("none").to_string(),
                service: service.to_string(),
                code: status.to_string(),
            })
            .inc();
        if !reason.is_empty() {
            if is_denial(reason) {
                self.denied
                    .get_or_create(&DeniedLabels {
                        listener: listener.to_string(),
                        reason: reason.to_string(),
                    })
                    .inc();
            } else {
                self.upstream_errors
                    .get_or_create(&ServiceReasonLabels {
                        service: service.to_string(),
                        reason: reason.to_string(),
                    })
                    .inc();
            }
        }
        self.request_duration
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .observe(duration.as_secs_f64());
        for (direction, n) in [("upstream", bytes_in), ("downstream", bytes_out)] {
            if n > 0 {
                self.bytes
                    .get_or_create(&BytesLabels {
                        service: service.to_string(),
                        direction: direction.to_string(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_and_failures_are_counted_by_reason() {
        let m = Metrics::new();
        m.record_request(
            "vm",
            None,
            None,
            403,
            "unknown_client",
            Duration::from_millis(1),
            0,
            0,
        );
        m.record_request(
            "vm",
            Some("t"),
            Some("reviews"),
            503,
            "gateway_unreachable",
            Duration::from_millis(1),
            0,
            0,
        );
        m.record_request(
            "vm",
            Some("t"),
            Some("reviews"),
            200,
            "",
            Duration::from_millis(1),
            10,
            20,
        );
        let text = m.encode();
        assert!(
            text.contains(r#"meshgate_denied_total{listener="vm",reason="unknown_client"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"meshgate_upstream_errors_total{service="reviews",reason="gateway_unreachable"} 1"#
        ));
        assert!(text.contains(
            r#"meshgate_requests_total{listener="vm",tenant="t",service="reviews",code="200"} 1"#
        ));
        assert!(
            text.contains(r#"meshgate_bytes_total{service="reviews",direction="downstream"} 20"#)
        );
    }
}
