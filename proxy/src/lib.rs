//! meshgate: a shared forwarding proxy that carries plain HTTP from untouched VMs into an Istio
//! mesh over mTLS, through the east-west gateway in AUTO_PASSTHROUGH mode.
//!
//! The modules follow the request path: `listener` → `forward` (using `policy` and `route`) →
//! `upstream`. `config` and `identity` feed them; `app` wires them together.

pub mod admin;
pub mod app;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod explain;
pub mod forward;
pub mod fuzz_targets;
pub mod identity;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod transcode;
pub mod upstream;
