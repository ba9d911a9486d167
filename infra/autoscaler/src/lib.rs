//! meshgate-autoscaler: sizes the meshgate Auto Scaling group from the fleet's load in
//! Prometheus, and lets instances go only once they have drained.
//!
//! - [`prom`]: the signals (Prometheus instant queries) and instances' `/metrics`;
//! - [`decide`]: the pure decision rule (HPA's proportional rule with tolerance, bounds,
//!   scale-up limit, scale-down stabilization, warm-up, and no scale-in on missing data);
//! - [`asg`]: the AWS calls (Auto Scaling via `aws-sdk-autoscaling`, EC2 private IPs);
//! - [`controller`]: the loop, the lifecycle hooks (drain on `Terminating:Wait`, readiness on
//!   `Pending:Wait`), `/metrics` and `/healthz`;
//! - [`simulate`]: offline replay of a load trace through the same decision code.

pub mod asg;
pub mod config;
pub mod controller;
pub mod decide;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod prom;
pub mod simulate;

/// Re-exported so tests and tools can build clients and credentials with the same versions.
pub use aws_credential_types;
pub use aws_sdk_autoscaling;
