//! # hat — device–cloud collaborative LLM inference
//!
//! A decoder-only LLM with L layers is cut in three: the **input submodel** (embedding + layers
//! `[0, K1)`) and the **output submodel** (layers `[L-K2, L)` + final norm + LM head) stay on the
//! user's device; the **middle submodel** (layers `[K1, L-K2)`) runs in the cloud. Only hidden
//! states cross the network.
//!
//! Modules, one per concept:
//! - [`config`]: checkpoint configs and the validated runtime [`config::ModelConfig`];
//! - [`source`]: model sources (Hugging Face directory, hub id, GGUF) and their loaders;
//! - [`tokenizer`]: tokenizers, chat templates, streaming detokenization;
//! - [`model`]: the splittable engine (embedding, layer ranges with KV caches, head);
//! - [`cache`]: the truncatable KV cache;
//! - [`kernels`]: fused CPU kernels for short-block attention and SwiGLU;
//! - [`split`]: plans, manifests and the device/cloud bundles;
//! - [`generate`]: sampling and the decoding loop;
//! - [`dataset`]: conversation data sets (ShareGPT, truncated files included);
//! - [`memory`]: process-wide allocator settings.

pub mod adapter;
pub mod cache;
pub mod cloud;
pub mod config;
pub mod dataset;
pub mod digest;
pub mod edge;
pub mod error;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod link;
pub mod memory;
pub mod model;
pub mod progress;
pub mod protocol;
pub mod sampling;
pub mod source;
pub mod split;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
