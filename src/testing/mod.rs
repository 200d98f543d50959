//! Test fixtures, behind the `testing` cargo feature (the integration tests and benchmarks enable
//! it through the crate's own dev-dependency; it is not part of the default public API):
//! - [`tiny`]: tiny random models written to disk, for tests that need a real model directory
//!   without any download;
//! - [`bench`]: settings from the environment and medians, for the benchmarks;
//! - [`procs`]: `hat serve-cloud` and `hat run-edge` as processes, pinned or not, over emulated
//!   links, for the benchmarks;
//! - [`world`]: the set-up the integration tests and benchmarks share: the default model, split,
//!   its cloud serving on loopback, and edges connected to it.

pub mod bench;
pub mod procs;
pub mod tiny;
pub mod world;

pub use tiny::{byte_tokenizer, tiny_model, TinySpec, SPECIAL_TOKENS, TINY_VOCAB};
pub use world::{cloud_config, connect, default_gguf, oracle_adapter, SplitWorld};
