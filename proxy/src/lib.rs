//! meshgate: a shared forwarding proxy that carries plain HTTP from untouched VMs into an Istio
//! mesh over mTLS, through the east-west gateway in AUTO_PASSTHROUGH mode.
//!
//! The modules follow the request path: `listener` → `pipeline` (using `policy` and `route`) →
//! `upstream`. `config` and `identity` feed them; `runtime` is the handle they share; `app`
//! wires them together and nothing but the binary and the demo imports it.

pub mod admin;
pub mod app;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod explain;
pub mod fuzz_targets;
pub mod h1;
pub mod identity;
pub mod import;
pub mod inbound;
pub mod io;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy_protocol;
pub mod route;
pub mod runtime;
pub mod telemetry;
pub mod transcode;
pub mod upstream;
