//! tollgate: an AI gateway whose live event stream is its heart.
//!
//! The library holds everything; `src/main.rs` is only the command line, so
//! tests, benchmarks and load tools reuse the same code.

pub mod admin;
pub mod auth;
pub mod breaker;
pub mod budget;
pub mod config;
pub mod error;
pub mod events;
pub mod guardrails;
pub mod health;
pub mod ledger;
pub mod metrics;
pub mod pricing;
pub mod proxy;
pub mod reload;
pub mod sched;
pub mod server;
pub mod store;
pub mod store_watch;
pub mod tail;
pub mod ui;

/// This build's version, reported by `/health` and `system.startup`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
