//! Load tests for meshgate: a load generator (`gen`), the side-by-side comparison with HAProxy
//! and the upstream alone (`runner`), and the report it writes (`report`).

pub mod gen;
pub mod procfs;
pub mod quota;
pub mod report;
pub mod runner;
