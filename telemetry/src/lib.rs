//! Flotilla's telemetry, shared by the engine and the CLI:
//!
//! - [`metrics`]: a node's Prometheus metrics, and [`http`]: the scrape endpoint;
//!   [`exposition`]: a strict checker of the text format they are served in;
//! - [`health`]: hardware health signals from `/sys`, with injection for tests;
//! - [`trace`]: the binary fault-trace format (docs/trace-format.md), its writer and
//!   validating reader; [`record`]: recording while the guest runs;
//! - [`analyze`] and [`export`]: `flotilla trace stats` and `flotilla trace export`.

pub mod analyze;
pub mod export;
pub mod exposition;
pub mod health;
pub mod http;
pub mod metrics;
pub mod record;
pub mod trace;
