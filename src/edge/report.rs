//! What a generation reports: tokens, timings, drafting statistics, bytes on the link and where
//! the time went.

use serde::Serialize;

use crate::decode::{DraftStats, StopReason};
use crate::edge::{DraftingReport, Mode};

/// What a generation did, how fast, and what it cost on the link.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    pub token_ids: Vec<u32>,
    pub mode: Mode,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub ttft_ms: f64,
    pub tbt_ms: f64,
    /// Cloud round trips after prefill.
    pub rounds: usize,
    /// Generated tokens per round (accepted drafts + the corrected or bonus token).
    pub mean_accepted: f64,
    /// Accepted drafts / drafts sent.
    pub acceptance_rate: f64,
    pub drafts_sent: usize,
    pub drafts_accepted: usize,
    /// Per draft position of a round (0 = the first draft): how often it was checked (every
    /// draft before it accepted) and how often accepted. Their ratio is the acceptance rate of
    /// position i given the ones before it.
    pub draft_checks: Vec<usize>,
    pub draft_hits: Vec<usize>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub device_compute_ms: f64,
    pub cloud_compute_ms: f64,
    /// Time the device waited for replies (network and cloud queueing included).
    pub network_wait_ms: f64,
    /// Times the cloud was lost and the session opened again and replayed, and the time lost
    /// to that (the wait that showed the loss, reconnecting, replaying; part of the waits).
    pub cloud_reconnects: u32,
    pub recovery_ms: f64,
    /// With `--fallback slm`, when the cloud was lost for good: the index of the first token
    /// the on-device SLM made alone (not verified by the cloud), and why the cloud was given up.
    /// The timing and drafting figures then cover the whole answer only roughly.
    pub unverified_from: Option<usize>,
    pub cloud_error: Option<String>,
    pub stop_reason: StopReason,
    /// The prefill chunks' lengths, in order.
    pub chunk_plan: Vec<usize>,
    /// How it drafted: draft head, threshold and its inputs, time per phase, drafting ahead.
    #[serde(flatten)]
    pub drafting: DraftingReport,
}


impl EdgeReport {
    /// The drafting statistics this report was made from (to add several generations up).
    pub fn draft_stats(&self) -> DraftStats {
        DraftStats {
            rounds: self.rounds,
            committed: self.generated_tokens.saturating_sub(1),
            drafts_sent: self.drafts_sent,
            drafts_accepted: self.drafts_accepted,
            draft_checks: self.draft_checks.clone(),
            draft_hits: self.draft_hits.clone(),
        }
    }
}
