//! Distilling the draft adapter (`hat train-adapter`).
//!
//! The SLM on the device is input submodel → adapter → output submodel → head; only the adapter
//! trains. The teacher is the model itself: for each training sequence, one pass of the whole
//! model gives the input submodel's hidden states (the student's input) and the model's
//! next-token distribution at every position (kept as its top-k, renormalised). The loss is the
//! soft cross-entropy of the student's distribution against the teacher's (KL up to a constant),
//! plus an optional per-position-normalised regression of the adapter's output onto the middle
//! layers' output (position 0 is an attention sink ~40× the norm of the others, so plain MSE
//! would learn little else). Gradients flow through the frozen output submodel and head with
//! differentiable ops only.
//!
//! Teacher outputs are computed once and reused every epoch: training steps cost only the
//! adapter, the output submodel and the head.
//!
//! Files: [`config`] (settings), [`teacher`] (the teacher and self-distillation), [`samples`]
//! (their cache), [`loss`], [`optim`] (AdamW, clipping), [`weights`] (the trainable adapter),
//! [`checkpoint`], [`batches`], [`eval`] (held-out evaluation), [`report`], [`run`] (the loop).
//!
//! May use every layer below the roles, and [`crate::edge`] (evaluation runs the real decoding
//! loop over an in-process link); never `cloud`.

pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod report;
pub mod run;
pub mod samples;
pub mod teacher;
pub mod weights;

pub use batches::epoch_batches;
pub use config::{AdapterInit, TrainConfig};
pub use eval::{evaluate, evaluate_adapter, HeldOut};
pub use report::{CurvePoint, Evaluation, StepTimes, TrainReport};
pub use run::{conversations_vocab, draft_vocab, train, TrainRun};
pub use teacher::{run_conversations, split_conversations, Sample, Trainer};
pub use weights::AdapterWeights;
