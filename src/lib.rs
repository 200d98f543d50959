//! # hat — device–cloud collaborative LLM inference
//!
//! A decoder-only LLM with L layers is cut in three: the **input submodel** (embedding + layers
//! `[0, K1)`) and the **output submodel** (layers `[L-K2, L)` + final norm + LM head) stay on the
//! user's device; the **middle submodel** (layers `[K1, L-K2)`) runs in the cloud. Only hidden
//! states cross the network.
//!
//! ## Layers
//!
//! The folders are layers; each one uses only those below it: nothing below the roles imports
//! a role, and of the roles only `train` uses another (`edge`, to evaluate with the real decoding
//! loop):
//!
//! ```text
//!   layer     folder      uses (besides util/ and error.rs, which every folder may use)
//!   service   api/    ──▶ profile/ edge/ split/ decode/ net/ io/
//!             loadgen ──▶ split/ net/ model/
//!             audit/  ──▶ decode/ net/ io/ model/
//!   roles     profile/ ─▶ edge/ adapter/ split/ net/ sched/ model/
//!             train/  ──▶ edge/ adapter/ split/ decode/ net/ io/ model/
//!             edge/   ──▶ adapter/ split/ decode/ net/ sched/ model/
//!             cloud/  ──▶ split/ net/ sched/ model/
//!   shared    adapter/ ─▶ split/ model/
//!             split/  ──▶ decode/ io/ model/
//!             net/    ──▶ sched/ model/
//!             decode/ ──▶ model/
//!   engine    io/     ──▶ model/
//!             model/  ──▶ (nothing)
//!   base      sched/ (arithmetic over measured costs), util/, error.rs
//! ```
//!
//! - [`model`]: the splittable engine: config, rope, decoder layers, layer stacks with their KV
//!   caches, CPU kernels; the training-only "beside" pass in its own file;
//! - [`io`]: model sources (Hugging Face directory, hub, GGUF), tokenizers and chat templates,
//!   conversation data sets;
//! - [`split`]: split plans, manifests, writing and loading the device and cloud bundles, and the
//!   three-stage pipeline run in one process;
//! - [`decode`]: sampling, the unsplit decoding loop, the speculative acceptance rule, timings;
//! - [`net`]: the wire protocol, TLS, QUIC transport settings, the edge's link to the cloud
//!   (QUIC or in-process) and link emulation;
//! - [`adapter`]: the draft adapter at run time and its file format;
//! - [`edge`]: the device's side of inference (prefill, drafting, verification, report);
//! - [`cloud`]: `hat serve-cloud`: the server, its sessions and its load;
//! - [`train`]: distilling the draft adapter;
//! - [`sched`]: cost models of the pipeline's stages, their least-squares fit, the prefill
//!   pipeline as a schedule that predicts TTFT, and the chunk planner;
//! - [`profile`]: `hat profile`: measuring the device, the cloud and the link into those cost
//!   models, the profile file, charts, and planning one session's prefill;
//! - [`api`]: `hat serve-edge`: the device side as a local OpenAI-compatible HTTP service;
//! - [`loadgen`]: `hat loadgen`: many sessions against one cloud, measuring the cloud alone;
//! - [`audit`]: `hat audit`: what a curious cloud recovers from the hidden states it sees.
//!
//! Still to come: learned inverters in `audit/` (over `train`).
//!
//! The `testing` feature adds `hat::testing`: tiny random models and the shared model → split →
//! cloud → connected edge set-up of the integration tests and benchmarks.

pub mod adapter;
pub mod api;
pub mod audit;
pub mod cloud;
pub mod decode;
pub mod edge;
pub mod error;
pub mod io;
pub mod loadgen;
pub mod model;
pub mod net;
pub mod profile;
pub mod sched;
pub mod split;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;
pub mod util;

pub use error::{Error, Result};
