//! What a run reports: the loss curve, held-out evaluations and where a step's time goes.


use serde::{Deserialize, Serialize};


use crate::train::config::TrainConfig;

/// A point of the loss curve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CurvePoint {
    pub step: usize,
    /// Seconds of training so far (evaluations and checkpoints not counted).
    pub elapsed_s: f64,
    pub loss: f64,
    pub lr: f64,
    pub tokens: usize,
}

/// An evaluation on held-out data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub step: usize,
    /// Seconds of training before it (evaluations and checkpoints not counted).
    pub elapsed_s: f64,
    /// Positions where the SLM's most likely token is the model's, teacher-forced.
    pub top1_agreement: f64,
    /// Generated tokens per round at γ = `eval_draft_len`, greedy, with the real decoding loop.
    pub mean_accepted: f64,
    pub acceptance_rate: f64,
    /// Acceptance of each draft position of a round given the ones before it (first draft first).
    #[serde(default)]
    pub acceptance_by_position: Vec<f64>,
}

/// What a training run writes next to the adapter (`ADAPTER.report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub split_id: String,
    pub train_sequences: usize,
    pub train_tokens: usize,
    pub held_out_sequences: usize,
    pub teacher_seconds: f64,
    pub curve: Vec<CurvePoint>,
    pub evals: Vec<Evaluation>,
    pub steps_done: usize,
    pub stopped_by: String,
    pub time_per_step_ms: StepTimes,
}

/// Where a step's time goes, ms: means over the run's steps, its resumed parts included (steps
/// from checkpoints of hat versions that did not record them are left out). The teacher runs
/// once, before training.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepTimes {
    pub student_forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub tokens_per_s: f64,
}

/// Training-step time summed over the steps of a run (its resumed parts included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StepTotals {
    pub(crate) steps: usize,
    pub(crate) tokens: usize,
    pub(crate) student_forward_ms: f64,
    pub(crate) backward_ms: f64,
    pub(crate) optimizer_ms: f64,
}

impl StepTotals {
    /// Per-step means.
    pub(crate) fn means(&self) -> StepTimes {
        let n = self.steps.max(1) as f64;
        let busy = (self.student_forward_ms + self.backward_ms + self.optimizer_ms) / 1e3;
        StepTimes {
            student_forward: self.student_forward_ms / n,
            backward: self.backward_ms / n,
            optimizer: self.optimizer_ms / n,
            tokens_per_s: if busy > 0.0 { self.tokens as f64 / busy } else { 0.0 },
        }
    }
}

