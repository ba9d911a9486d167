//! Accept loops for VM-facing listeners. `http.rs` serves HTTP/1.1 and h2c on one port;
//! `tcp.rs` carries opaque TCP to one service.

pub mod framing;
pub mod http;
pub mod proxy_protocol;
pub mod tcp;
