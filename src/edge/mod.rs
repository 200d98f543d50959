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
//! Drafting is made cheap and sized to its odds by the [`Drafter`] (a reduced draft vocabulary,
//! 8-bit draft compute) and the stopping rule in [`drafter`]; while the cloud verifies a round,
//! the device drafts the next one on the guess that every draft is accepted and the bonus token
//! is the draft's most likely one. When the reply agrees, every cache keeps what drafting ahead
//! put in (the LLM output cache takes back the drafted-ahead positions verification truncated,
//! [`crate::model::StackCache::restore`]) and the prepared round goes up at once; otherwise the
//! usual rollback discards it.
//!
//! With `--draft-tree` other than `chain` (the default is `auto`) a round drafts a tree instead
//! (`tree`: EAGLE-2's dynamic tree, sized from measured costs); the cloud verifies every branch
//! in one pass with a tree mask, the device walks down the accepted path
//! ([`crate::decode::accept_tree`]), and every cache keeps that path at consecutive positions.
//! While the cloud verifies a tree the device grows it on with nodes the cloud does not see;
//! when the bonus token is one of them, the next round is drafted already; and the likeliest
//! of them go to the cloud as rows extending the tree, which verification walks into when the
//! bonus token is there (greedy, `--draft-pipeline`; `tree`'s docs).
//!
//! Files: `state` (caches, timers, the steps every phase uses), `prefill` (chunked prefill),
//! `draft` (drafting a round and the next one ahead, the draft path), `tree` (drafting a tree,
//! verifying it, keeping its path), [`drafter`] (what drafts, the tree setting and when to
//! stop), [`report`] ([`EdgeReport`]); verification and the round loop are here, with the
//! acceptance rules from [`crate::decode::accept`].
//!
//! May use [`crate::adapter`], [`crate::net`], [`crate::split`], [`crate::decode`], [`crate::sched`],
//! [`crate::model`] and [`crate::util`]; never `cloud` or `train`.

mod draft;
pub mod drafter;
pub mod fallback;
mod prefill;
pub mod report;
mod state;
mod tree;

use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::adapter::Adapter;
use crate::decode::timing::{check_prompt, ms, TokenClock};
use crate::decode::{accept_greedy, accept_sampled, accept_tree, probs, Acceptance, DraftStats, Flow, Sampler, SamplingParams, StopReason, TreeAcceptance};
use crate::error::{CloudFailure, Result};
use crate::net::{MiddleLink, MiddleReply};
use crate::split::DeviceBundle;
use draft::{Ahead, Drafted, Limits};
use drafter::{DraftLength, PassTimes, RowCost, AUTO_TREE, PRIOR_NODE_THRESHOLD};
use state::Edge;

pub use drafter::{DraftOptions, Drafter, DraftingReport, Pipeline, TreeChoice, TreeSplit};
pub use fallback::{Fallback, SlmDecoder};
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

/// How the prompt is cut into prefill chunks.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunking {
    /// Chunks of this many positions (the last one shorter); 0 = the whole prompt at once.
    Fixed(usize),
    /// These chunk lengths, in order (from the planner, [`crate::sched::plan`]); they must sum
    /// to the prompt's length.
    Planned(Vec<usize>),
}

impl Chunking {
    /// The chunk lengths for a prompt of `len` positions.
    pub fn chunks(&self, len: usize) -> Result<Vec<usize>> {
        match self {
            Chunking::Fixed(size) => Ok(crate::sched::fixed_chunks(len, *size)),
            Chunking::Planned(c) if c.iter().sum::<usize>() == len && c.iter().all(|&x| x > 0) => Ok(c.clone()),
            Chunking::Planned(c) => Err(crate::error::Error::invalid(format!(
                "a chunk plan of {} positions in {} chunks does not cover the prompt's {len}",
                c.iter().sum::<usize>(),
                c.len()
            ))),
        }
    }

    /// The fixed chunk size (0 when planned), as `--json` reports it.
    pub fn size(&self) -> usize {
        match self {
            Chunking::Fixed(s) => *s,
            Chunking::Planned(_) => 0,
        }
    }
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub mode: Mode,
    /// γ: most tokens drafted per round.
    pub draft_len: usize,
    /// How the prompt is cut into prefill chunks.
    pub chunking: Chunking,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// The cloud's context limit (positions), from the handshake.
    pub max_context: usize,
    /// How the device drafts (hat mode).
    pub draft: DraftOptions,
    /// What to do when the cloud is lost for good mid-answer.
    pub fallback: Fallback,
}

/// Generates after `prompt`, calling `on_token` with each committed token (it returns
/// [`Flow::Stop`] to end the generation there); prepares the [`Drafter`] for `opts.draft` first
/// (see [`generate_with`] to prepare it once for many).
pub fn generate<L: MiddleLink>(
    dev: &DeviceBundle,
    adapter: &Adapter,
    link: &mut L,
    prompt: &[u32],
    opts: &EdgeOptions,
    on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<EdgeReport> {
    let options = if opts.mode == Mode::Hat { opts.draft } else { DraftOptions::plain() };
    let drafter = Drafter::new(dev, adapter, options)?;
    generate_with(dev, &drafter, link, prompt, opts, on_token)
}

/// [`generate`] with a prepared [`Drafter`] (its options replace `opts.draft`). With
/// [`Fallback::Slm`], an answer whose cloud is lost for good (unreachable, or lost and not found
/// again) is finished by the on-device SLM alone ([`finish_on_device`]).
///
/// Call it on a thread of the compute pool ([`crate::util::threads::in_pool`]) when nothing
/// else generates in the process: the kernels' parallel loops then start in place.
pub fn generate_with<L: MiddleLink>(
    dev: &DeviceBundle,
    drafter: &Drafter,
    link: &mut L,
    prompt: &[u32],
    opts: &EdgeOptions,
    mut on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<EdgeReport> {
    if opts.fallback == Fallback::None {
        return generate_verified(dev, drafter, link, prompt, opts, on_token);
    }
    let mut committed = Vec::new();
    let mut clock = TokenClock::start();
    let verified = generate_verified(dev, drafter, link, prompt, opts, |t| {
        committed.push(t);
        clock.token();
        on_token(t)
    });
    match verified {
        Err(e) if matches!(e.cloud_failure(), Some(CloudFailure::Unreachable | CloudFailure::Lost)) => {
            let stats = link.stats();
            finish_on_device(dev, drafter, prompt, committed, clock, opts, on_token, stats, e)
        }
        other => other,
    }
}

/// Finishes an answer whose cloud is gone with the on-device SLM ([`SlmDecoder`]) after the
/// `committed` tokens (verified ones); the report marks where the unverified tokens start.
#[allow(clippy::too_many_arguments)]
fn finish_on_device(
    dev: &DeviceBundle,
    drafter: &Drafter,
    prompt: &[u32],
    mut tokens: Vec<u32>,
    mut clock: TokenClock,
    opts: &EdgeOptions,
    mut on_token: impl FnMut(u32) -> Result<Flow>,
    link: crate::net::LinkStats,
    cause: crate::error::Error,
) -> Result<EdgeReport> {
    let verified = tokens.len();
    let eos = &dev.tokenizer.eos_token_ids;
    let mut slm = SlmDecoder::new(dev, &drafter.slm_adapter);
    let limit = crate::decode::Decoder::max_positions(&slm).min(opts.max_context);
    let mut sampler = Sampler::new(opts.sampling)?;
    let t = Instant::now();
    let mut stop = StopReason::MaxTokens;
    if tokens.last().is_some_and(|t| eos.contains(t)) {
        stop = StopReason::Eos;
    } else if tokens.len() < opts.max_tokens {
        let context: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
        let mut logits = crate::decode::Decoder::feed(&mut slm, &context)?;
        loop {
            let next = sampler.select(&logits)?;
            tokens.push(next);
            clock.token();
            if on_token(next)? == Flow::Stop {
                stop = StopReason::Stopped;
                break;
            }
            if eos.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            if tokens.len() >= opts.max_tokens {
                break;
            }
            if prompt.len() + tokens.len() + 1 > limit {
                stop = StopReason::ContextFull;
                break;
            }
            logits = crate::decode::Decoder::feed(&mut slm, &[next])?;
        }
    }
    Ok(EdgeReport {
        mode: opts.mode,
        prompt_tokens: prompt.len(),
        generated_tokens: tokens.len(),
        ttft_ms: clock.ttft_ms(),
        tbt_ms: clock.tbt_ms(),
        rounds: 0,
        mean_accepted: 0.0,
        acceptance_rate: 0.0,
        drafts_sent: 0,
        drafts_accepted: 0,
        draft_checks: Vec::new(),
        draft_hits: Vec::new(),
        bytes_up: link.bytes_up,
        bytes_down: link.bytes_down,
        device_compute_ms: ms(t.elapsed()),
        cloud_compute_ms: 0.0,
        network_wait_ms: 0.0,
        cloud_reconnects: link.reconnects,
        recovery_ms: ms(link.recovery),
        stop_reason: stop,
        chunk_plan: Vec::new(),
        drafting: DraftingReport::default(),
        unverified_from: Some(verified),
        cloud_error: Some(cause.to_string()),
        token_ids: tokens,
    })
}

/// The generation proper: every token verified by the cloud.
fn generate_verified<L: MiddleLink>(
    dev: &DeviceBundle,
    drafter: &Drafter,
    link: &mut L,
    prompt: &[u32],
    opts: &EdgeOptions,
    mut on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<EdgeReport> {
    let limit = opts.max_context.min(dev.input.max_positions());
    check_prompt(prompt, 0, limit)?;
    let eos = &dev.tokenizer.eos_token_ids;
    let drafting = opts.mode == Mode::Hat && opts.draft_len > 0;
    let trees = drafting && drafter.options.tree != TreeChoice::Chain;
    let overlap = drafting && drafter.options.overlap;
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut steps = DraftLength::new(drafter.options.threshold, sampler.is_greedy());
    let mut edge = Edge::new(dev, drafter, link);
    edge.greedy = sampler.is_greedy();
    let mut clock = TokenClock::start();

    let chunk_plan = opts.chunking.chunks(prompt.len())?;
    let logits = edge.prefill(prompt, &chunk_plan, drafting)?;
    let mut next = sampler.select(&logits)?;
    clock.token();
    let decoding = Instant::now();
    let mut tokens = vec![next];
    let mut stats = DraftStats::new(opts.draft_len);
    let mut stop = StopReason::MaxTokens;
    let mut stopped = on_token(next)? == Flow::Stop;
    if stopped {
        stop = StopReason::Stopped;
    }
    let mut times = RoundTimes::default();
    // The round of `next`, when it was drafted ahead during the previous round (a chain, or
    // the subtree under `next` of a tree).
    let mut prepared: Option<Drafted> = None;
    let mut prepared_tree: Option<tree::TreeRound> = None;
    let mut ahead_clock = tree::AheadClock::default();
    let mut ahead_policy = tree::AheadPolicy::default();
    // Trees: the rows the last verification kept (the cloud learns them with the next block),
    // the measured cost of a row, nodes sent.
    let mut keep: Vec<u16> = Vec::new();
    let mut row_cost = RowCost::default();
    // The cloud's measured passes by rows (what splitting a tree weighs).
    let mut passes = PassTimes::default();
    // Extending a sent tree with what drafting ahead grows (`--draft-pipeline`).
    let pipeline = if trees && overlap && sampler.is_greedy() { drafter.options.pipeline } else { Pipeline::Off };
    // Sending a tree as two blocks (`--draft-tree-split`, greedy).
    let split = if trees && sampler.is_greedy() { drafter.options.split } else { TreeSplit::Off };
    // Catch-up rounds (`--draft-catch-up`): trees drafted ahead.
    let catch_up_rounds = trees && overlap && drafter.options.catch_up;
    // The link's part of a round (ms: from sending a tree to its reply, less the cloud's
    // compute), recent rounds weighted most.
    let mut link_ms: Option<f64> = None;
    let (mut tree_nodes, mut node_threshold) = (0usize, 0f32);

    let done = |tokens: &[u32], stop: &mut StopReason| {
        if tokens.last().is_some_and(|t| eos.contains(t)) {
            *stop = StopReason::Eos;
            true
        } else {
            tokens.len() >= opts.max_tokens
        }
    };
    // Most drafts for a round at position `base` after `committed` tokens: γ, fewer near the
    // token and context limits.
    let gamma_at = |committed: usize, base: usize| {
        if drafting {
            opts.draft_len.min(opts.max_tokens.saturating_sub(committed + 1)).min(limit.saturating_sub(base + 1))
        } else {
            0
        }
    };
    // `--draft-vocab-context`: the draft head also scores the tokens of the text it drafts
    // after: the prompt's now (after TTFT), then the committed ones before each round.
    let context_rows = drafting && drafter.options.context_rows;
    if context_rows {
        let t = Instant::now();
        edge.head.add_context(&dev.head, prompt)?;
        times.draft += t.elapsed();
    }
    // Committed tokens the draft head has seen.
    let mut context_seen = 0;
    while !stopped && !done(&tokens, &mut stop) {
        let base = prompt.len() + tokens.len() - 1; // position of `next`
        if base + 1 > limit {
            stop = StopReason::ContextFull;
            break;
        }
        if context_rows {
            let t = Instant::now();
            edge.head.add_context(&dev.head, &tokens[context_seen..])?;
            context_seen = tokens.len();
            times.draft += t.elapsed();
        }
        let threshold = steps.threshold();
        if trees {
            let gamma = gamma_at(tokens.len(), base);
            let limits = tree_limits(drafter.options.tree, gamma, limit.saturating_sub(base + 1), threshold, &steps, &row_cost, sampler.is_greedy());
            node_threshold = limits.node_threshold;
            let t = Instant::now();
            let was_prepared = prepared_tree.is_some();
            // A draft path far behind (the prompt's positions after prefill) sends the root
            // alone and catches up while the cloud verifies it ([`tree::CATCH_UP_ROUND_ROWS`]).
            let catch_up = !was_prepared && catch_up_rounds && edge.draft_path_backlog()? >= tree::CATCH_UP_ROUND_ROWS;
            let mut round = match prepared_tree.take() {
                Some(tree) => edge.reseed_tree(tree, base, &limits)?,
                None if catch_up => edge.root_round(next)?,
                None => edge.draft_tree(next, base, &limits, eos, &sampler, &mut steps)?,
            };
            times.draft += t.elapsed();
            if !catch_up {
                ahead_policy.record_draft(was_prepared, ms(t.elapsed()));
            }
            let n = round.shape.len();
            // `--draft-tree-split`: the first rows go alone, the rest right after them.
            let first = match split {
                TreeSplit::Off => n,
                TreeSplit::Rows(rows) => rows.min(n),
                TreeSplit::Auto => split_costs(&*edge.link, &passes, base, n, row_cost.per_row_ms(), times.extensions_used, stats.rounds).map_or(n, |costs| tree::split_point(round.shape.parents(), &round.sent_cums(), &costs)),
            };
            edge.hold_back(&mut round, first)?;
            edge.link.submit_tree(base, &round.hidden, round.shape.parents(), &keep)?;
            let sent = Instant::now();
            edge.send_rows(&mut round, base, n)?;
            times.splits += usize::from(first < n);
            if catch_up {
                let t = Instant::now();
                edge.expand_root(&mut round, &sampler, &mut steps)?;
                times.catch_up += t.elapsed();
                times.catch_up_rounds += 1;
            }
            // A catch-up round drafts ahead whatever the policy: the next round is drafted
            // from the root it just ran.
            let ahead = overlap && (catch_up || ahead_policy.this_round());
            // With the pipeline, the likeliest of what drafting ahead grows goes to the cloud as
            // an extension of the tree, as soon as some is worth it.
            ahead_clock.extend = match (ahead, pipeline) {
                (false, _) | (_, Pipeline::Off) => None,
                (true, Pipeline::Rows(rows)) => Some(tree::ExtendPlan { rows: tree::ExtensionRows::Fixed(rows), sent: 0 }),
                (true, Pipeline::Auto) => {
                    // The second block of a split tree holds the cloud before the extension.
                    let held = if first < n { passes.predict(n - first, edge.link.predicted_compute_ms(n - first, base + first)).unwrap_or(0.0) } else { 0.0 };
                    let sizing = extension_sizing(&*edge.link, base + n, steps.ms_per_token, link_ms, row_cost.per_row_ms(), held);
                    Some(tree::ExtendPlan { rows: sizing.map_or(tree::ExtensionRows::Fixed(0), tree::ExtensionRows::Sized), sent: 0 })
                }
            };
            if ahead {
                // The tree grows on while the cloud verifies it (neither the reply nor timing
                // decides anything here: the committed tokens are the LLM's whatever the tree
                // holds).
                let t = Instant::now();
                ahead_clock.sent_at(sent);
                let grew = edge.grow_ahead(&mut round, base, limit - base, eos, &sampler, &mut ahead_clock)?;
                times.ahead += t.elapsed();
                times.ahead_rounds += usize::from(grew);
            }
            let extension = ahead_clock.extend.take().map_or(0, |p| p.sent);
            times.extensions += usize::from(extension > 0);
            tree_nodes += n - 1 + extension;
            let reply = edge.receive()?;
            let replied = sent.elapsed();
            ahead_clock.received();
            if overlap {
                ahead_policy.record(ahead, ms(reply.cloud_compute), edge.link.predicted_compute_ms(first, base));
            }
            // A catch-up round may read its reply late: it says nothing about the link.
            if !catch_up {
                let this_link_ms = (ms(replied) - ms(reply.cloud_compute)).max(0.0);
                link_ms = Some(link_ms.map_or(this_link_ms, |l| 0.7 * l + 0.3 * this_link_ms));
            }
            let t = Instant::now();
            // The round's blocks by their first rows: the tree's first rows, the rest of a split
            // tree, the extension; each one's logits `(rows, vocab)` and reply once the walk needs
            // them (replies come in order).
            let starts: Vec<usize> = [(0, true), (first, first < n), (n, extension > 0)].into_iter().filter_map(|(start, sent)| sent.then_some(start)).collect();
            let mut got = vec![(edge.tree_logits(&reply, &round.shape, 0)?, reply)];
            // What waiting for the extension's reply and verifying its rows took (ms).
            let mut extension_wait = 0.0;
            let TreeAcceptance { path, next: new_token } = accept_tree(
                |i| round.children(i),
                |i| {
                    let block = starts.iter().rposition(|&s| s <= i).unwrap_or(0);
                    while got.len() <= block {
                        let t = Instant::now();
                        let r = edge.receive()?;
                        got.push((edge.tree_logits(&r, &round.shape, starts[got.len()])?, r));
                        if starts[got.len() - 1] == n {
                            extension_wait = ms(t.elapsed());
                        }
                    }
                    sampler.select(&got[block].0.get(i - starts[block])?)
                },
            )?;
            let used = got.len();
            for (b, (_, r)) in got.iter().enumerate() {
                let end = starts.get(b + 1).copied().unwrap_or(n + extension);
                passes.record(end - starts[b], ms(r.cloud_compute));
            }
            let walked = used > 1;
            times.splits_used += usize::from(path.iter().any(|&i| (first..n).contains(&i)));
            let walked_extension = extension > 0 && used == starts.len();
            times.extensions_used += usize::from(walked_extension);
            // Replies the walk did not need go unread; the next block's kept path still indexes
            // the whole tree, extension included.
            edge.stale += starts.len() - used;
            let reply = if used == 1 {
                got.swap_remove(0).1
            } else {
                let hidden = Tensor::cat(&got.iter().map(|(_, r)| &r.hidden).collect::<Vec<_>>(), 1)?;
                let cloud_compute = got.iter().map(|(_, r)| r.cloud_compute).sum();
                MiddleReply { hidden, cloud_compute, ..got.swap_remove(0).1 }
            };
            let depth = (0..round.shape.len()).map(|i| round.shape.depth(i)).max().unwrap_or(0);
            stats.record(depth, path.len() - 1);
            let last = path.last().copied().unwrap_or(0);
            let hit = round.ahead_child(last, new_token);
            if ahead {
                ahead_policy.record_hit(hit.is_some());
                let saved = if walked_extension { tree::AheadPolicy::walk_saving(&path, n, steps.ms_per_token.unwrap_or(0.0), extension_wait) } else { 0.0 };
                ahead_policy.record_extension(saved);
            }
            match hit {
                Some(child) => {
                    prepared_tree = Some(edge.keep_tree_ahead(base, &path, child, &round, &reply)?);
                    times.ahead_hits += 1;
                }
                None => edge.keep_tree_path(base, &path, &round, &reply)?,
            }
            keep = path.iter().map(|&i| i as u16).collect();
            times.verify += t.elapsed();
            // A round whose verification waited for a later block's reply says nothing about
            // the cost of the first block's rows.
            if !walked && !catch_up {
                row_cost.record(first, ms(sent.elapsed()));
            }
            let new: Vec<u32> = path[1..].iter().map(|&i| round.tokens[i]).chain([new_token]).collect();
            stopped = commit(&new, &mut tokens, &mut clock, &mut on_token, &done, &mut stop)?;
            next = new_token;
            steps.ms_per_token = Some(ms(decoding.elapsed()) / (tokens.len() - 1) as f64);
            continue;
        }
        let t = Instant::now();
        let limits = Limits { gamma: gamma_at(tokens.len(), base), threshold, eos, until_reply: false };
        let round = match prepared.take() {
            // Drafted ahead, cut short by the reply: drafting goes on.
            Some(mut round) if round.open => {
                edge.extend_draft(&mut round, &limits, &mut sampler, &mut steps)?;
                round
            }
            Some(round) => round,
            None => edge.draft(next, &limits, drafting, &mut sampler, &mut steps)?,
        };
        times.draft += t.elapsed();
        let Drafted { verify, drafts, draft_probs, .. } = round;

        // Verify: the cloud runs positions base..=base+k in one round trip; meanwhile the
        // device drafts the next round on the guess that all k drafts are accepted.
        let x = if verify.len() == 1 { verify[0].clone() } else { Tensor::cat(&verify, 1)? };
        edge.link.submit(base, &x)?;
        let k = drafts.len();
        let ends = drafts.last().is_some_and(|d| eos.contains(d));
        let (next_committed, next_base) = (tokens.len() + k + 1, base + k + 1);
        let mut ahead = None;
        if overlap && !ends && next_committed < opts.max_tokens && next_base < limit {
            let t = Instant::now();
            let until_reply = sampler.is_greedy();
            // Greedy: drafting ahead only fills time the device would wait, so it drafts whatever the
            // odds until the reply is in. Sampling: the reply must not decide the draws, so the
            // threshold bounds the work instead.
            let threshold = if until_reply { 0.0 } else { threshold };
            ahead = edge.draft_ahead(&Limits { gamma: gamma_at(next_committed, next_base), threshold, eos, until_reply }, &mut sampler, &mut steps)?;
            times.ahead += t.elapsed();
            times.ahead_rounds += usize::from(ahead.is_some());
        }
        let ahead_llm_len = edge.llm_output.len();
        let reply = edge.receive()?;

        let t = Instant::now();
        let logits = edge.llm_logits(&reply, state::Logits::All)?.ok_or_else(|| crate::error::Error::invalid("internal: no logits"))?; // (k + 1, vocab)
        let Acceptance { accepted: a, next: new_token } = if sampler.is_greedy() {
            accept_greedy(&drafts, |i| sampler.select(&logits.get(i)?))?
        } else {
            let params = sampler.params();
            accept_sampled(&drafts, &draft_probs, |i| probs(&logits.get(i)?, &params), &mut sampler)?
        };
        stats.record(k, a);
        match ahead {
            Some(Ahead { bonus, round }) if a == k && bonus == new_token => {
                edge.keep_ahead(ahead_llm_len)?;
                prepared = Some(round);
                times.ahead_hits += 1;
            }
            _ => edge.keep_accepted(base, a, &verify, &reply, drafting)?,
        }
        times.verify += t.elapsed();
        let new: Vec<u32> = drafts[..a].iter().copied().chain([new_token]).collect();
        stopped = commit(&new, &mut tokens, &mut clock, &mut on_token, &done, &mut stop)?;
        next = new_token;
        steps.ms_per_token = Some(ms(decoding.elapsed()) / (tokens.len() - 1) as f64);
    }
    stats.committed = tokens.len() - 1;
    let link_stats = edge.link.stats();
    let drafting_report = DraftingReport {
        draft_vocab: drafter.head.len(),
        draft_context_rows: edge.head.context_rows(),
        draft_int8: drafter.options.int8,
        overlap,
        draft_threshold: if drafting { steps.threshold() } else { 0.0 },
        threshold_source: if drafting { steps.source().to_string() } else { "off".to_string() },
        draft_step_ms: steps.step_ms().unwrap_or(0.0),
        ms_per_token: steps.ms_per_token.unwrap_or(0.0),
        draft_ms: ms(times.draft),
        verify_ms: ms(times.verify),
        ahead_ms: ms(times.ahead),
        ahead_rounds: times.ahead_rounds,
        ahead_hits: times.ahead_hits,
        ahead_steps_given_up: edge.steps_given_up,
        pipeline: pipeline != Pipeline::Off,
        extensions: times.extensions,
        extensions_used: times.extensions_used,
        tree_splits: times.splits,
        tree_splits_used: times.splits_used,
        prefill_draft_rows: edge.prefill_draft_rows,
        catch_up_rounds: times.catch_up_rounds,
        catch_up_ms: ms(times.catch_up),
        ahead_cloud_slowdown: ahead_policy.slowdown().unwrap_or(0.0),
        draft_tree: if drafting { drafter.options.tree.name() } else { "off".to_string() },
        tree_nodes,
        tree_nodes_per_round: if trees && stats.rounds > 0 { tree_nodes as f64 / stats.rounds as f64 } else { 0.0 },
        node_threshold,
        row_cost_ms: row_cost.per_row_ms().unwrap_or(0.0),
        draft_top_prob: if trees { steps.top_prob() } else { 0.0 },
    };
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
        cloud_reconnects: link_stats.reconnects,
        recovery_ms: ms(link_stats.recovery),
        unverified_from: None,
        cloud_error: None,
        stop_reason: stop,
        chunk_plan,
        drafting: drafting_report,
        token_ids: tokens,
    })
}

/// Commits a round's tokens in order, each timed and handed to `on_token`, until `done`; true
/// when `on_token` stopped the generation.
fn commit(new: &[u32], tokens: &mut Vec<u32>, clock: &mut TokenClock, on_token: &mut impl FnMut(u32) -> Result<Flow>, done: &impl Fn(&[u32], &mut StopReason) -> bool, stop: &mut StopReason) -> Result<bool> {
    for &t in new {
        tokens.push(t);
        clock.token();
        if on_token(t)? == Flow::Stop {
            *stop = StopReason::Stopped;
            return Ok(true);
        }
        if done(tokens, stop) {
            break;
        }
    }
    Ok(false)
}

/// How far a tree may grow this round: `gamma` drafts on a path at most, `slots` positions left
/// in the context; thresholds from measured costs for `auto` (priors with sampling).
fn tree_limits(choice: TreeChoice, gamma: usize, slots: usize, level_threshold: f32, steps: &DraftLength, row_cost: &RowCost, greedy: bool) -> tree::TreeLimits {
    let (nodes, depth, width, branch, node_threshold, level_threshold) = match choice {
        TreeChoice::Fixed { nodes, depth } => {
            let depth = depth.unwrap_or(gamma).max(1);
            let width = nodes.div_ceil(depth).max(1);
            (nodes, depth, width, width, 0.0, 0.0)
        }
        TreeChoice::Auto | TreeChoice::Chain => {
            let (nodes, width, branch) = AUTO_TREE;
            let node_threshold = match (greedy, row_cost.per_row_ms(), steps.ms_per_token) {
                (true, Some(r), Some(t)) if t > 0.0 => ((r / t) as f32).clamp(0.005, 0.5),
                _ => PRIOR_NODE_THRESHOLD,
            };
            (nodes, gamma, width, branch, node_threshold, level_threshold)
        }
    };
    tree::TreeLimits { nodes: nodes.min(slots), depth: depth.min(gamma), width, branch, node_threshold, level_threshold, top_prob: steps.top_prob() }
}

/// Most rows a tree's extension adds (`--draft-pipeline`).
const EXTENSION_ROWS: usize = 16;
/// What verifying a row costs the device (ms) until the measured row cost says.
const PRIOR_DEVICE_ROW_MS: f64 = 1.0;

/// How to size the extension of a tree whose rows end at position `end`, from the time per
/// committed token (`token_ms`, measured), the link's part of a round (`link_ms`), the
/// measured cost of a row on the critical path (`row_ms`) and the cloud's cost model; `None`
/// until the first two are measured. See [`tree::ExtensionSizing`].
/// `held` (ms): what the cloud computes between the tree's first block and the extension (the
/// rest of a split tree), which delays the extension's reply and uses the link's part of the
/// round too.
fn extension_sizing<L: MiddleLink + ?Sized>(link: &L, end: usize, token_ms: Option<f64>, link_ms: Option<f64>, row_ms: Option<f64>, held: f64) -> Option<tree::ExtensionSizing> {
    let (token_ms, link_ms) = (token_ms?, link_ms?);
    let (cloud_row, device_row) = row_shares(link, end, row_ms);
    let wait_ms = (1..=EXTENSION_ROWS)
        .map_while(|m| {
            // Rows the cloud cannot finish before the next block would arrive would hold that
            // block up in rounds that do not walk into them.
            let pass = held + link.predicted_compute_ms(m, end).unwrap_or(m as f64 * (cloud_row + 3.0));
            (pass <= link_ms).then_some(pass + m as f64 * device_row)
        })
        .collect();
    Some(tree::ExtensionSizing { token_ms, wait_ms })
}

/// A row's cost on the critical path split into the cloud's share (its cost model's slope at
/// `end`; 0 without a model) and the device's verification (the measured row cost `row_ms`
/// less the cloud's share; a prior until measured), ms.
fn row_shares<L: MiddleLink + ?Sized>(link: &L, end: usize, row_ms: Option<f64>) -> (f64, f64) {
    let cloud_row = match (link.predicted_compute_ms(1, end), link.predicted_compute_ms(2, end)) {
        (Some(a), Some(b)) => (b - a).max(0.0),
        _ => 0.0,
    };
    (cloud_row, row_ms.map_or(PRIOR_DEVICE_ROW_MS, |r| (r - cloud_row).clamp(0.2, 5.0)))
}

/// What splitting the tree of `n` rows at `base` into two blocks would cost and save
/// ([`tree::split_point`]): the cloud's pass for every block size (measured, or its cost
/// model's), the device's verification per row, and the share of the `rounds` so far that
/// walked into an extension (`walked`); `None` without a cost model.
fn split_costs<L: MiddleLink + ?Sized>(link: &L, passes: &PassTimes, base: usize, n: usize, row_ms: Option<f64>, walked: usize, rounds: usize) -> Option<tree::SplitCosts> {
    let pass_ms = (0..=n).map(|m| if m == 0 { Some(0.0) } else { passes.predict(m, link.predicted_compute_ms(m, base)) }).collect::<Option<Vec<f64>>>()?;
    let (_, device_row_ms) = row_shares(link, base, row_ms);
    let extension_share = if rounds > 0 { walked as f64 / rounds as f64 } else { 0.0 };
    Some(tree::SplitCosts { pass_ms, device_row_ms, extension_share })
}

/// Where a generation's decoding rounds spent the device's time.
#[derive(Debug, Default)]
struct RoundTimes {
    draft: Duration,
    ahead: Duration,
    verify: Duration,
    ahead_rounds: usize,
    ahead_hits: usize,
    extensions: usize,
    extensions_used: usize,
    splits: usize,
    splits_used: usize,
    /// Catch-up rounds and the draft path they ran while the cloud verified their root.
    catch_up_rounds: usize,
    catch_up: Duration,
}
