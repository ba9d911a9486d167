//! The end-to-end suite as one test binary (one link instead of one per file): each module is
//! one area, run against the real binary or in-process meshgate and meshsim, through real sockets.

mod autoscaler;
#[path = "core.rs"]
mod data_path;
mod faults;
mod grpc;
mod hardening;
mod hbone;
#[path = "h3.rs"]
mod http3;
mod inbound;
mod isolation;
mod issuers;
mod ops;
mod patterns;
mod prometheus;
mod proxy_protocol;
mod tcp;
mod telemetry;
mod tenant_identity;
mod transcode;
mod websocket;
