//! Decoding: how tokens are chosen and committed, shared by `hat generate`, the edge and
//! training's evaluation.
//!
//! - [`sampling`]: sampling settings ([`SamplingParams`]) and the seeded [`Sampler`];
//! - [`generate`](mod@generate): the unsplit decoding loop over any [`Decoder`];
//! - [`accept`]: the speculative acceptance rule (greedy and rejection sampling) as pure
//!   functions, and drafting statistics;
//! - [`timing`]: TTFT/TBT and the checks a prompt must pass.
//!
//! May use [`crate::model`] and [`crate::util`]; never a role.

pub mod accept;
pub mod generate;
pub mod sampling;
pub mod timing;

pub use accept::{accept_greedy, accept_sampled, accept_tree, Acceptance, DraftStats, TreeAcceptance};
pub use generate::{generate, Decoder, Flow, GenerationReport, ModelDecoder, StopReason};
pub use sampling::{probs, processed_probs, Sampler, SamplingParams};
