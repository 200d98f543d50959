//! The device's state during one generation: its caches, the queues of the draft path, and its
//! timers; the steps every phase uses (the input submodel, the LLM's output submodel on a reply,
//! receiving, rollback).

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::adapter::{Adapter, DraftHead};
use crate::edge::drafter::Drafter;
use crate::error::Result;
use crate::model::StackCache;
use crate::net::{MiddleLink, MiddleReply};
use crate::split::DeviceBundle;

/// Which logits [`Edge::llm_logits`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Logits {
    All,
    Last,
    None,
}

/// The device's caches and timers for one generation.
pub(super) struct Edge<'a, L: MiddleLink> {
    pub(super) dev: &'a DeviceBundle,
    pub(super) adapter: &'a Adapter,
    /// The draft head, with the rows this generation adds from its text
    /// ([`DraftHead::add_context`]).
    pub(super) head: DraftHead,
    /// The output submodel for drafted positions ([`Drafter::output`]).
    pub(super) draft_output: &'a crate::model::LayerStack,
    pub(super) link: &'a mut L,
    pub(super) input: StackCache,
    pub(super) adapter_cache: StackCache,
    pub(super) slm_output: StackCache,
    pub(super) llm_output: StackCache,
    /// Input-submodel hidden states of positions `[adapter_cache.len(), input.len())`, not yet
    /// run through the draft path.
    pub(super) tail: Option<Tensor>,
    /// Conditioned adapters: middle outputs (the cloud's, or drafted) of positions
    /// `[adapter_cache.len() - 1, …)` (position -1 is a zero row), `(1, n, hidden)`.
    pub(super) features: Option<Tensor>,
    /// The draft logits at the last position when drafting stopped there on low confidence
    /// (the tail is then empty); cleared when positions are added or rolled back.
    pub(super) last_logits: Option<Tensor>,
    /// A reply that arrived while the device was drafting ahead.
    early: Option<MiddleReply>,
    /// Replies still to come for blocks sent on a wrong guess (`--draft-pipeline`): dropped
    /// when they arrive.
    pub(super) stale: usize,
    /// Steps of drafting ahead given up part-way because the reply came in.
    pub(super) steps_given_up: usize,
    /// Prompt positions the draft path had run when prefill ended (the rest ran in the first
    /// draft round).
    pub(super) prefill_draft_rows: usize,
    /// Adapter positions to run again on the cloud's middle outputs before the next drafting
    /// ahead: the first position, input states `(1, n, hidden)` and their conditions (a tree's
    /// path kept with its drafted-ahead subtree, [`Edge::keep_tree_ahead`]).
    pub(super) refresh: Option<(usize, Tensor, Tensor)>,
    /// Greedy decoding: the LLM's logits come from [`crate::model::Head::forward_greedy`]
    /// (the same argmax; a screened head reads a quarter of the bytes).
    pub(super) greedy: bool,
    pub(super) device_time: Duration,
    pub(super) wait_time: Duration,
    pub(super) cloud_time: Duration,
}

impl<'a, L: MiddleLink> Edge<'a, L> {
    pub(super) fn new(dev: &'a DeviceBundle, drafter: &'a Drafter, link: &'a mut L) -> Self {
        let adapter = &drafter.adapter;
        Self {
            input: dev.input.new_cache(),
            adapter_cache: adapter.layers.new_cache(),
            slm_output: dev.output.new_cache(),
            llm_output: dev.output.new_cache(),
            dev,
            adapter,
            head: drafter.head.clone(),
            draft_output: &drafter.output,
            link,
            tail: None,
            features: None,
            last_logits: None,
            early: None,
            stale: 0,
            steps_given_up: 0,
            prefill_draft_rows: 0,
            refresh: None,
            greedy: false,
            device_time: Duration::ZERO,
            wait_time: Duration::ZERO,
            cloud_time: Duration::ZERO,
        }
    }

    /// Embeds `ids` and runs the input submodel at the next positions: `(1, n, hidden)`.
    pub(super) fn input_hidden(&mut self, ids: &[u32]) -> Result<Tensor> {
        let t = Instant::now();
        let x = self.dev.embedder.embed_ids(ids)?;
        let h = self.dev.input.forward(&x, self.input.len(), &mut self.input)?;
        self.device_time += t.elapsed();
        Ok(h)
    }

    /// Whether the pending reply has arrived (it is kept for [`Edge::receive`]).
    pub(super) fn reply_arrived(&mut self) -> Result<bool> {
        while self.early.is_none() {
            match self.link.try_receive()? {
                Some(_) if self.stale > 0 => self.stale -= 1,
                Some(r) => {
                    self.cloud_time += r.cloud_compute;
                    self.early = Some(r);
                }
                None => break,
            }
        }
        Ok(self.early.is_some())
    }

    pub(super) fn receive(&mut self) -> Result<MiddleReply> {
        if let Some(r) = self.early.take() {
            return Ok(r);
        }
        let t = Instant::now();
        while self.stale > 0 {
            self.link.receive()?;
            self.stale -= 1;
        }
        let r = self.link.receive()?;
        self.wait_time += t.elapsed();
        self.cloud_time += r.cloud_compute;
        Ok(r)
    }

    /// Runs the LLM output submodel on a reply; returns logits `(count, vocab)` for every
    /// position ([`Logits::All`]), only the last `(1, vocab)` ([`Logits::Last`]), or none
    /// ([`Logits::None`]: the reply only extends the output cache, e.g. a prompt chunk before
    /// the last).
    pub(super) fn llm_logits(&mut self, r: &MiddleReply, which: Logits) -> Result<Option<Tensor>> {
        let t = Instant::now();
        self.llm_output.truncate(r.start);
        let y = self.dev.output.forward(&r.hidden, r.start, &mut self.llm_output)?;
        let head = &self.dev.head;
        let logits = match which {
            Logits::All if self.greedy => Some(head.forward_greedy(&y)?.squeeze(0)?),
            Logits::All => Some(head.forward(&y)?.squeeze(0)?),
            Logits::Last if self.greedy => Some(head.forward_greedy(&y.narrow(1, y.dim(1)? - 1, 1)?)?.squeeze(1)?),
            Logits::Last => Some(head.forward_last(&y)?),
            Logits::None => None,
        };
        self.device_time += t.elapsed();
        Ok(logits)
    }

    /// After verification of the round at `base` (the committed token, then its drafts, of
    /// which `accepted` were accepted): every device cache keeps the accepted prefix (the cloud
    /// follows from the start position of the next block), and the draft path's queues are made
    /// to match, whatever the draft path ran beyond the round (drafting ahead).
    pub(super) fn keep_accepted(&mut self, base: usize, accepted: usize, verify: &[Tensor], reply: &MiddleReply, drafting: bool) -> Result<()> {
        self.rollback(base + accepted + 1);
        if self.adapter.is_conditioned() && self.adapter_cache.len() > base {
            // Drafts after the first were conditioned on predictions: run the accepted ones again
            // on the cloud's middle outputs.
            self.adapter_cache.truncate(base + 1);
            self.slm_output.truncate(base + 1);
            self.features = None;
            self.tail = if accepted > 0 { Some(Tensor::cat(&verify[1..=accepted], 1)?) } else { None };
        } else {
            // The queue held positions [adapter_cache.len(), …): keep those still valid.
            let keep = (base + accepted + 1).saturating_sub(self.adapter_cache.len());
            self.tail = match self.tail.take() {
                Some(t) if keep > 0 => Some(t.narrow(1, 0, keep.min(t.dim(1)?))?),
                _ => None,
            };
        }
        if self.adapter.is_conditioned() && drafting {
            self.push_features(&reply.hidden.narrow(1, 0, accepted + 1)?)?;
        }
        Ok(())
    }

    /// After verification when the round drafted ahead was guessed right (every draft accepted,
    /// the bonus token as guessed): every cache keeps what drafting ahead put in. Only the LLM
    /// output cache changed: verification truncated it to the round's start and wrote the
    /// round's exact positions; it takes back the drafted-ahead positions after them, up to
    /// `ahead_len`, its length when drafting ahead stopped.
    pub(super) fn keep_ahead(&mut self, ahead_len: usize) -> Result<()> {
        self.llm_output.restore(ahead_len)
    }

    pub(super) fn rollback(&mut self, valid: usize) {
        self.refresh = None;
        self.input.truncate(valid);
        self.adapter_cache.truncate(valid);
        self.slm_output.truncate(valid);
        self.llm_output.truncate(valid);
        self.last_logits = None;
    }
}
