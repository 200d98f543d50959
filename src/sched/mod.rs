//! Scheduling from measured costs: the cost model of a stage and its least-squares fit
//! ([`cost`]), the prefill pipeline as a schedule that predicts TTFT ([`pipeline`]), and the
//! chunk planner that picks the chunking with the least predicted TTFT ([`chunking`]).
//!
//! Pure arithmetic over numbers: uses nothing but [`crate::error`]. The measuring is in
//! [`crate::profile`]; the edge plans its prefill with [`chunking::plan`].

pub mod chunking;
pub mod cost;
pub mod pipeline;

pub use chunking::{equal_chunks, fixed_chunks, plan, ChunkPlan};
pub use cost::{fit, CloudModel, FittedStage, Regimes, Residuals, StageCost, Timing};
pub use pipeline::{LinkEstimate, PipelineCosts, Schedule};
