//! The proxy crate's integration tests as one test binary: the `meshgate` command (config
//! checks, explain, the process lifecycle) and the fuzz corpus replay.

mod cli;
mod explain;
mod fuzz_corpus;
mod lifecycle;
