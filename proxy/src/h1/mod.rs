//! meshgate's own HTTP/1.1 server for the VM-facing listener: `parse.rs` reads request heads
//! and makes the one framing decision, `chunked.rs` decodes chunked bodies, `body.rs` hands
//! bodies to the pipeline, `write.rs` writes responses, `conn.rs` runs a connection, and
//! `buf.rs` lends buffers only while bytes are in flight.
//!
//! Why not hyper's server: it keeps 16 KiB of buffers per connection for the connection's whole
//! life, and a second parser watching its input to enforce the smuggling rules drifted from it
//! (issue #19). Here the parser that frames the byte stream is the one that enforces the rules.

pub mod body;
pub mod buf;
pub mod chunked;
pub mod conn;
pub mod parse;
pub mod write;

pub use body::H1Body;
pub use conn::{serve, Settings};
pub use parse::HeadLimits;
