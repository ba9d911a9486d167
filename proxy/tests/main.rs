//! The proxy crate's integration tests as one test binary: the `meshgate` command (config
//! checks, explain, the demo, the process lifecycle and its logs) and the fuzz corpus replay.

mod cli;
mod demo;
mod explain;
mod fuzz_corpus;
mod inbound;
mod lifecycle;
mod services;
