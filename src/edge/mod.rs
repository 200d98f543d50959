//! The device's side of HAT inference: chunked prefill, speculative drafting with the on-device
//! SLM (input submodel → adapter → output submodel → head), verification of the drafts by the
//! cloud's middle layers in one round trip, and rollback of every cache to the accepted length.
//! `Mode::UShape` is the baseline: the same split without drafting, one round trip per token.
//!
//! Caches on the device, all indexed by position:
//! - input submodel (shared by the SLM and the LLM paths: same layers, same hidden states);
//! - adapter and SLM output submodel (the draft path);
//! - LLM output submodel (runs on the cloud's replies). With an adapter whose draft context is
//!   [`crate::adapter::DraftContext::Verified`] the SLM drafts behind these exact states instead of keeping an
//!   output cache of its own: each draft appends one position, and the next verification
//!   truncates the cache back to the round's start.
//!
//! The cloud's middle cache is truncated by the start position of the next block it receives.
//!
//! A feature-conditioned adapter (see [`crate::adapter`]) reads the middle output of the previous
//! position: the cloud's, for verified positions, or its own prediction, for drafts. After each
//! verification its cache is rolled back to the round's first position and the accepted drafts
//! are run again with the cloud's middle outputs (the next round does that in one block).
//!
//! Files: `state` (caches, timers, the steps every phase uses), `prefill` (chunked prefill),
//! `draft` (drafting a round, the draft path), [`report`] ([`EdgeReport`]); verification and the round loop are
//! here, with the acceptance rule from [`crate::decode::accept`].
//!
//! May use [`crate::adapter`], [`crate::net`], [`crate::split`], [`crate::decode`],
//! [`crate::model`] and [`crate::util`]; never `cloud` or `train`.

mod draft;
mod prefill;
pub mod report;
mod state;

use candle_core::Tensor;
use serde::Serialize;

use crate::adapter::Adapter;
use crate::decode::timing::{check_prompt, ms, TokenClock};
use crate::decode::{accept_greedy, accept_sampled, probs, Acceptance, DraftStats, Sampler, SamplingParams, StopReason};
use crate::error::Result;
use crate::net::MiddleLink;
use crate::split::DeviceBundle;
use draft::Drafted;
use state::Edge;

pub use report::EdgeReport;

/// How the edge generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Speculative decoding with the on-device SLM, verified by the cloud.
    Hat,
    /// U-shaped split inference without drafting: one round trip per generated token.
    UShape,
}

/// Settings of one generation.
#[derive(Debug, Clone, Copy)]
pub struct EdgeOptions {
    pub mode: Mode,
    /// γ: most tokens drafted per round.
    pub draft_len: usize,
    /// Prompt positions per prefill chunk; 0 = the whole prompt at once.
    pub chunk_size: usize,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// The cloud's context limit (positions), from the handshake.
    pub max_context: usize,
}

/// Generates after `prompt`, calling `on_token` with each committed token.
pub fn generate<L: MiddleLink>(
    dev: &DeviceBundle,
    adapter: &Adapter,
    link: &mut L,
    prompt: &[u32],
    opts: &EdgeOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<EdgeReport> {
    let limit = opts.max_context.min(dev.input.max_positions());
    check_prompt(prompt, 0, limit)?;
    let eos = &dev.tokenizer.eos_token_ids;
    let drafting = opts.mode == Mode::Hat && opts.draft_len > 0;
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut edge = Edge::new(dev, adapter, link);
    let mut clock = TokenClock::start();

    let logits = edge.prefill(prompt, opts.chunk_size, drafting)?;
    let mut next = sampler.select(&logits)?;
    clock.token();
    let mut tokens = vec![next];
    on_token(next)?;
    let mut stats = DraftStats::new(opts.draft_len);
    let mut stop = StopReason::MaxTokens;

    let done = |tokens: &[u32], stop: &mut StopReason| {
        if tokens.last().is_some_and(|t| eos.contains(t)) {
            *stop = StopReason::Eos;
            true
        } else {
            tokens.len() >= opts.max_tokens
        }
    };
    while !done(&tokens, &mut stop) {
        let base = edge.input.len(); // position of `next`
        if base + 1 > limit {
            stop = StopReason::ContextFull;
            break;
        }
        // Draft: γ tokens, fewer near the token and context limits.
        let budget = opts.max_tokens - tokens.len();
        let gamma = if drafting { opts.draft_len.min(budget.saturating_sub(1)).min(limit - base - 1) } else { 0 };
        let Drafted { verify, drafts, draft_probs } = edge.draft(next, gamma, drafting, &mut sampler, eos)?;

        // Verify: the cloud runs positions base..=base+k in one round trip.
        let x = if verify.len() == 1 { verify[0].clone() } else { Tensor::cat(&verify, 1)? };
        edge.link.submit(base, &x)?;
        let reply = edge.receive()?;
        let logits = edge.llm_logits(&reply, true)?; // (k + 1, vocab)
        let Acceptance { accepted: a, next: new_token } = if sampler.is_greedy() {
            accept_greedy(&drafts, |i| sampler.select(&logits.get(i)?))?
        } else {
            let params = sampler.params();
            accept_sampled(&drafts, &draft_probs, |i| probs(&logits.get(i)?, &params), &mut sampler)?
        };
        stats.record(drafts.len(), a);
        edge.keep_accepted(base, a, drafts.len(), &verify, &reply, drafting)?;
        for &t in drafts[..a].iter().chain(std::iter::once(&new_token)) {
            tokens.push(t);
            clock.token();
            on_token(t)?;
            if done(&tokens, &mut stop) {
                break;
            }
        }
        next = new_token;
    }
    stats.committed = tokens.len() - 1;
    let link_stats = edge.link.stats();
    Ok(EdgeReport {
        mode: opts.mode,
        prompt_tokens: prompt.len(),
        generated_tokens: tokens.len(),
        ttft_ms: clock.ttft_ms(),
        tbt_ms: clock.tbt_ms(),
        rounds: stats.rounds,
        mean_accepted: stats.mean_accepted(),
        acceptance_rate: stats.acceptance_rate(),
        drafts_sent: stats.drafts_sent,
        drafts_accepted: stats.drafts_accepted,
        draft_checks: stats.draft_checks,
        draft_hits: stats.draft_hits,
        bytes_up: link_stats.bytes_up,
        bytes_down: link_stats.bytes_down,
        device_compute_ms: ms(edge.device_time),
        cloud_compute_ms: ms(edge.cloud_time),
        network_wait_ms: ms(edge.wait_time),
        stop_reason: stop,
        token_ids: tokens,
    })
}
