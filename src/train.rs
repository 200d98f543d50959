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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, DraftContext, Storage};
use crate::dataset::Conversation;
use crate::edge::{EdgeOptions, Mode};
use crate::error::{Error, Result};
use crate::generate::SamplingParams;
use crate::link::LocalMiddle;
use crate::model::{Model, Ops, StackCache};
use crate::protocol::WireDtype;
use crate::split::{CloudBundle, DeviceBundle};
use crate::tokenizer::Message;

/// How the adapter's layers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterInit {
    /// Copies of middle layers, evenly spaced over the middle range.
    Middle,
    /// Copies of one model layer.
    Layer(usize),
    /// Middle-layer copies whose output projections start at zero: each layer starts as the
    /// identity (the SLM starts by skipping the middle).
    Identity,
}

impl AdapterInit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "middle" => Ok(Self::Middle),
            "identity" => Ok(Self::Identity),
            _ => s
                .strip_prefix("layer:")
                .and_then(|n| n.parse().ok())
                .map(Self::Layer)
                .ok_or_else(|| Error::invalid(format!("--init '{s}': expected middle, identity or layer:N"))),
        }
    }
}

/// Every training setting (stored in checkpoints, reports and the adapter's metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub adapter_layers: usize,
    /// Feature-conditioned (EAGLE-style) adapter: its input also has the previous position's
    /// middle output (see [`crate::adapter`]).
    #[serde(default)]
    pub conditioned: bool,
    /// What the SLM's output submodel attends to at earlier positions, in training as at run time.
    #[serde(default)]
    pub draft_context: DraftContext,
    /// Drafts of a round trained per position: draft k ≥ 2 reads the adapter's own prediction
    /// for the position before it (conditioned adapters; 1 = the first draft only).
    #[serde(default = "one")]
    pub draft_steps: usize,
    pub init: AdapterInit,
    /// Length of the learning-rate schedule, and the most steps run.
    pub steps: usize,
    /// Stop after this many seconds of training steps (evaluations and checkpoints not
    /// counted); the learning-rate schedule then ends with the budget if it comes before `steps`.
    pub time_budget_s: Option<f64>,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence, at most.
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub clip: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Conversations held out (never trained on) for evaluation.
    pub held_out: usize,
    /// Training conversations used, at most.
    pub max_conversations: usize,
    /// Teacher distribution kept per position: its top-k tokens.
    pub teacher_top_k: usize,
    /// Negatives per step for the sampled softmax; 0 = exact softmax over the whole vocabulary.
    pub negatives: usize,
    /// Weight of the normalised feature regression (0 = off).
    pub feature_weight: f64,
    /// Conditioned adapters: Gaussian noise added in training to the middle outputs they read,
    /// this many times each position's root mean square (0 = off), so that drafts after the first,
    /// which read the adapter's own predictions, are less far from what it was trained on.
    #[serde(default)]
    pub feature_noise: f64,
    /// Held-out prompts and tokens for the acceptance evaluation.
    pub eval_prompts: usize,
    pub eval_tokens: usize,
    pub eval_draft_len: usize,
    /// Replies generated by the model itself (cached on disk), this many tokens each; 0 = off.
    pub self_distill_tokens: usize,
    /// Prompts generated for together in self-distillation.
    #[serde(default = "default_self_distill_batch")]
    pub self_distill_batch: usize,
    /// How the adapter file stores the weights (training runs in f32; the final evaluation is
    /// of the weights as stored).
    #[serde(default)]
    pub storage: Storage,
}

fn one() -> usize {
    1
}

fn default_self_distill_batch() -> usize {
    64
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            adapter_layers: 1,
            conditioned: false,
            draft_context: DraftContext::Drafted,
            draft_steps: 1,
            init: AdapterInit::Middle,
            steps: 400,
            time_budget_s: None,
            batch_size: 4,
            seq_len: 256,
            lr: 3e-4,
            warmup: 20,
            weight_decay: 0.0,
            clip: 1.0,
            seed: 0,
            eval_every: 100,
            checkpoint_every: 50,
            held_out: 16,
            max_conversations: 600,
            teacher_top_k: 64,
            negatives: 1024,
            feature_weight: 0.0,
            feature_noise: 0.0,
            eval_prompts: 6,
            eval_tokens: 48,
            eval_draft_len: 4,
            self_distill_tokens: 0,
            self_distill_batch: default_self_distill_batch(),
            storage: Storage::F16,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("--adapter-layers", self.adapter_layers),
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--teacher-top-k", self.teacher_top_k),
            ("--eval-every", self.eval_every),
            ("--checkpoint-every", self.checkpoint_every),
            ("--self-distill-batch", self.self_distill_batch),
            ("--draft-steps", self.draft_steps),
        ];
        if let Some(name) = crate::error::first_zero(&positive) {
            return Err(Error::invalid(format!("{name} must be at least 1")));
        }
        if self.draft_steps > 1 && !self.conditioned {
            return Err(Error::invalid("--draft-steps above 1 needs --conditioning features (an unconditioned adapter never reads its own drafts)"));
        }
        if self.seq_len < 8 {
            return Err(Error::invalid("--seq-len must be at least 8"));
        }
        if self.self_distill_tokens > 0 && self.self_distill_tokens + 8 > self.seq_len {
            return Err(Error::invalid(format!("--self-distill {} leaves no room for a prompt in --seq-len {}", self.self_distill_tokens, self.seq_len)));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || !(self.clip > 0.0) || self.weight_decay < 0.0 || self.feature_weight < 0.0 || !(self.feature_noise >= 0.0) {
            return Err(Error::invalid("--lr and --clip must be positive, --weight-decay, --feature-weight and --feature-noise >= 0"));
        }
        Ok(())
    }

    /// Whether the teacher's middle outputs are kept (conditioning input, verified draft
    /// context, feature loss).
    fn keeps_middle(&self) -> bool {
        self.conditioned || self.draft_context == DraftContext::Verified || self.feature_weight > 0.0
    }

    /// Learning rate at `step` (0-based) after `elapsed_s` of training: linear warm-up, then
    /// cosine decay to a tenth, paced by whichever ends first, `steps` or the time budget.
    pub fn lr_at(&self, step: usize, elapsed_s: f64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f64;
        let by_steps = (step - self.warmup) as f64 / span;
        let by_time = self.time_budget_s.map_or(0.0, |b| elapsed_s / b.max(1e-9));
        let t = by_steps.max(by_time).min(1.0);
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

/// One tokenised training sequence with the teacher's view of it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sequence's token ids (`len`).
    pub ids: Vec<u32>,
    /// Input submodel hidden states `(len, hidden)`.
    pub input_hidden: Tensor,
    /// Middle layers' output `(len, hidden)` (conditioned adapters and the feature loss).
    pub middle_hidden: Option<Tensor>,
    /// Teacher top-k ids `(len, k)` u32 and probabilities `(len, k)` f32 (renormalised over the
    /// top-k, sorted by decreasing probability): the model's next-token distribution at each
    /// position.
    pub top_ids: Tensor,
    pub top_probs: Tensor,
    /// The output submodel's keys and values over `middle_hidden`, `(1, kv_heads, len, head_dim)`
    /// per layer: computed once per run for adapters that draft behind verified positions.
    pub output_kv: Option<Vec<(Tensor, Tensor)>>,
}

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
struct StepTotals {
    steps: usize,
    tokens: usize,
    student_forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
}

impl StepTotals {
    /// Per-step means.
    fn means(&self) -> StepTimes {
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

/// AdamW whose moments can be saved and restored (exact resume).
struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: Vec<(String, Var)>) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        let vv = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, m, v: vv, step: 0 })
    }

    /// One update with the given gradients (already clipped).
    fn update(&mut self, grads: &candle_core::backprop::GradStore, lr: f64, wd: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - Self::B1.powi(t), 1.0 - Self::B2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            self.m[i] = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let m_hat = (&self.m[i] / c1)?;
            let v_hat = (&self.v[i] / c2)?;
            let step = (m_hat / (v_hat.sqrt()? + Self::EPS)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * wd))?;
            var.set(&(decayed - (step * lr)?)?)?;
        }
        Ok(())
    }
}

/// Global-norm clipping factor for `grads` of `vars`.
fn clip_factor(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    Ok(if norm > max_norm { max_norm / norm } else { 1.0 })
}

/// Scales every gradient in place by `f`.
fn scale_grads(grads: &mut candle_core::backprop::GradStore, vars: &[(String, Var)], f: f64) -> Result<()> {
    if f == 1.0 {
        return Ok(());
    }
    for (_, v) in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * f)?);
        }
    }
    Ok(())
}

/// Everything training needs that does not change during a run.
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub device: &'a DeviceBundle,
    pub cloud: &'a CloudBundle,
    pub config: TrainConfig,
}

/// Renders a conversation's first exchange with the chat template and tokenises it.
fn sequence_ids(device: &DeviceBundle, c: &Conversation, seq_len: usize) -> Result<Option<Vec<u32>>> {
    let Some(prompt) = c.first_prompt() else { return Ok(None) };
    let tok = &device.tokenizer;
    let mut messages = vec![Message::user(prompt)];
    let reply = c.turns.iter().skip_while(|t| t.role != "user").find(|t| t.role == "assistant");
    let text = match (&tok.chat_template, reply) {
        (Some(t), Some(r)) => {
            messages.push(Message { role: "assistant".into(), content: r.text.clone() });
            t.render(&messages, false)?
        }
        (Some(t), None) => t.render(&messages, true)?,
        (None, Some(r)) => format!("{prompt}\n{}", r.text),
        (None, None) => prompt.to_string(),
    };
    let mut ids = tok.encode(&text)?;
    ids.truncate(seq_len);
    Ok((ids.len() >= 8).then_some(ids))
}

/// Seeded split of conversations (with a prompt) into (train, held-out).
pub fn split_conversations(mut conversations: Vec<Conversation>, held_out: usize, max_train: usize, seed: u64) -> (Vec<Conversation>, Vec<Conversation>) {
    conversations.retain(|c| c.first_prompt().is_some_and(|p| !p.trim().is_empty()));
    conversations.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed));
    let held = conversations.split_off(conversations.len().saturating_sub(held_out));
    conversations.truncate(max_train);
    (conversations, held)
}

impl<'a> Trainer<'a> {
    /// The teacher's pass over one sequence.
    pub fn teach(&self, ids: &[u32]) -> Result<Sample> {
        let x = self.model.embedder.embed_ids(ids)?;
        let (h_in, h_mid, out) = self.teacher_layers(&x, 0, &mut self.teacher_caches())?;
        let k = self.top_k();
        let (top_ids, top_probs) = top_k_softmax(&self.device.head.forward(&out)?.squeeze(0)?, k)?;
        let n = ids.len();
        Ok(Sample {
            ids: ids.to_vec(),
            input_hidden: h_in.squeeze(0)?,
            middle_hidden: self.config.keeps_middle().then(|| h_mid.squeeze(0)).transpose()?,
            top_ids: Tensor::from_vec(top_ids, (n, k), &Device::Cpu)?,
            top_probs: Tensor::from_vec(top_probs, (n, k), &Device::Cpu)?,
            output_kv: None,
        })
    }

    /// Empty caches for [`Self::teacher_layers`].
    fn teacher_caches(&self) -> [StackCache; 3] {
        [self.device.input.new_cache(), self.cloud.middle.new_cache(), self.device.output.new_cache()]
    }

    /// The whole model's layers on embeddings `x`, `(batch, seq, hidden)` at positions
    /// `pos..pos + seq`, as the split runs them: the input submodel's, middle layers' and output
    /// submodel's hidden states, each `(batch, seq, hidden)`.
    fn teacher_layers(&self, x: &Tensor, pos: usize, caches: &mut [StackCache; 3]) -> Result<(Tensor, Tensor, Tensor)> {
        let [ci, cm, co] = caches;
        let h_in = self.device.input.forward(x, pos, ci)?;
        let h_mid = self.cloud.middle.forward(&h_in, pos, cm)?;
        let h_out = self.device.output.forward(&h_mid, pos, co)?;
        Ok((h_in, h_mid, h_out))
    }

    /// Teacher tokens kept per position: `--teacher-top-k`, at most the vocabulary.
    fn top_k(&self) -> usize {
        self.config.teacher_top_k.min(self.device.manifest.config.vocab_size)
    }

    /// Self-distillation data: the model's own greedy replies to `prompts`, up to `tokens` tokens
    /// each (cut after an end-of-sequence token), with the teacher's view of every position of
    /// prompt + reply. Prompts of equal length run together, `batch` at a time, and the teacher's
    /// outputs are recorded while the reply is generated, so no second pass is needed. Greedy
    /// ties aside, each reply is what `hat generate` says. Returns one sample per prompt, in
    /// order; the last reply token is a target only (it is never fed back).
    pub fn self_distill(&self, prompts: &[Vec<u32>], tokens: usize, batch: usize, progress: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::invalid("self-distillation: empty prompt"));
            }
            by_len.entry(p.len()).or_default().push(i);
        }
        progress.set_length((prompts.len() * tokens) as u64);
        progress.set_position(0);
        progress.set_message("self-distill");
        let mut out: Vec<Option<Sample>> = vec![None; prompts.len()];
        for group in by_len.values() {
            for chunk in group.chunks(batch.max(1)) {
                let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
                for (&i, s) in chunk.iter().zip(self.reply_batch(&rows, tokens, progress)?) {
                    out[i] = Some(s);
                }
            }
        }
        out.into_iter().map(|s| s.ok_or_else(|| Error::invalid("internal: a prompt was not distilled"))).collect()
    }

    /// [`Self::self_distill`] for prompts of one length.
    fn reply_batch(&self, prompts: &[&[u32]], tokens: usize, progress: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
        let (b, len) = (prompts.len(), prompts[0].len());
        let k = self.top_k();
        let eos = &self.device.tokenizer.eos_token_ids;
        let head = &self.device.head;
        let mut caches = self.teacher_caches();
        // Per row: ids fed, and per block of fed positions (h_in, middle, top ids, top probs).
        let mut ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut parts: Vec<Vec<(Tensor, Option<Tensor>, Vec<u32>, Vec<f32>)>> = vec![vec![]; b];
        let mut done = vec![false; b];
        let mut x = self.model.embedder.forward(&Tensor::new(prompts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u32>>(), &Device::Cpu)?.reshape((b, len))?)?;
        let mut pos = 0;
        for step in 0..tokens {
            let seq = x.dim(1)?;
            let (h_in, h_mid, h_out) = self.teacher_layers(&x, pos, &mut caches)?;
            pos += seq;
            let mut next = vec![0u32; b];
            // Decode steps: the head on all rows at once, (b, vocab); the prompt block: one row at
            // a time, (seq, vocab) each.
            let decoded = if seq == 1 { Some(top_k_softmax(&head.forward(&h_out)?.squeeze(1)?, k)?) } else { None };
            for r in 0..b {
                if done[r] {
                    next[r] = eos.first().copied().unwrap_or(0);
                    continue;
                }
                let (top_ids, top_probs) = match &decoded {
                    Some((ids, probs)) => (ids[r * k..(r + 1) * k].to_vec(), probs[r * k..(r + 1) * k].to_vec()),
                    None => top_k_softmax(&head.forward(&h_out.i(r)?.unsqueeze(0)?)?.squeeze(0)?, k)?,
                };
                next[r] = top_ids[(seq - 1) * k];
                let middle_rows = self.config.keeps_middle().then(|| h_mid.i(r)).transpose()?;
                parts[r].push((h_in.i(r)?, middle_rows, top_ids, top_probs));
                if eos.contains(&next[r]) || step + 1 == tokens {
                    done[r] = true;
                } else {
                    ids[r].push(next[r]);
                }
            }
            progress.inc(b as u64);
            if done.iter().all(|&d| d) {
                break;
            }
            x = self.model.embedder.forward(&Tensor::new(next, &Device::Cpu)?.reshape((b, 1))?)?;
        }
        let dev = &Device::Cpu;
        ids.into_iter()
            .zip(parts)
            .map(|(ids, parts)| {
                let n = ids.len();
                let cat = |v: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&v, 0)?) };
                let middle = if self.config.keeps_middle() { Some(cat(parts.iter().filter_map(|p| p.1.clone()).collect())?) } else { None };
                let top: Vec<u32> = parts.iter().flat_map(|p| p.2.iter().copied()).collect();
                let probs: Vec<f32> = parts.iter().flat_map(|p| p.3.iter().copied()).collect();
                Ok(Sample {
                    input_hidden: cat(parts.iter().map(|p| p.0.clone()).collect())?,
                    middle_hidden: middle,
                    top_ids: Tensor::from_vec(top, (n, k), dev)?,
                    top_probs: Tensor::from_vec(probs, (n, k), dev)?,
                    output_kv: None,
                    ids,
                })
            })
            .collect()
    }

    /// The student's loss on a batch, and the number of positions it covers. `negatives`: token
    /// ids shared by the batch for the sampled softmax (unused when `config.negatives` is 0).
    fn batch_loss(&self, adapter: &Adapter, batch: &[&Sample], negatives: &[u32], noise_seed: u64) -> Result<(Tensor, usize)> {
        let len = batch.iter().map(|s| s.input_hidden.dim(0)).collect::<candle_core::Result<Vec<_>>>()?;
        let max = len.iter().copied().max().unwrap_or(0);
        let dev = &Device::Cpu;
        // Right padding: causal attention never lets real positions see the pads; a mask drops
        // the pads from the loss.
        let pad = |t: &Tensor, n: usize| pad_axis(t, 0, n);
        let x = Tensor::stack(&batch.iter().map(|s| pad(&s.input_hidden, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let middle = || -> Result<Tensor> {
            let m = batch.iter().map(|s| s.middle().and_then(|t| pad(t, max))).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&m, 0)?)
        };
        let ids = Tensor::stack(&batch.iter().map(|s| pad(&s.top_ids, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let probs = Tensor::stack(&batch.iter().map(|s| pad(&s.top_probs, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let mask: Vec<f32> = len.iter().flat_map(|&l| (0..max).map(move |i| if i < l { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (batch.len(), max), dev)?;
        let positions: usize = len.iter().sum();

        let output = self.device.output.clone().with_ops(Ops::Differentiable);
        let head = self.device.head.clone().with_ops(Ops::Differentiable);
        let target = if self.config.keeps_middle() { Some(middle()?) } else { None };
        // The output submodel's keys and values over the true middle outputs, padded like the
        // states (the causal masks never let real positions see the pads).
        let output_kv = match batch.iter().map(|s| s.output_kv.as_ref()).collect::<Option<Vec<_>>>() {
            Some(kv) if !kv.is_empty() => {
                let layer = |i: usize, which: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
                    Ok(Tensor::cat(&kv.iter().map(|s| pad_axis(which(&s[i]), 2, max)).collect::<Result<Vec<_>>>()?, 0)?)
                };
                Some((0..kv[0].len()).map(|i| Ok((layer(i, |p| &p.0)?, layer(i, |p| &p.1)?))).collect::<Result<Vec<_>>>()?)
            }
            _ => None,
        };
        // Soft cross-entropy of the drafts made from output-submodel states `h` against the
        // teacher, averaged over the real positions.
        let neg_mask = if self.config.negatives == 0 { None } else { Some(negative_mask(&ids, negatives)?) };
        let token_loss = |h: &Tensor| -> Result<Tensor> {
            let logp = if self.config.negatives == 0 {
                // Exact: log-softmax over the whole vocabulary.
                let logp = candle_nn::ops::log_softmax(&head.forward(h)?, D::Minus1)?; // (b, max, vocab)
                logp.gather(&ids, D::Minus1)? // (b, max, k)
            } else {
                // Sampled softmax: the teacher's top-k candidates of each position plus negatives
                // shared by the batch; no (positions × vocab) tensor is ever built.
                let (b, s, k) = ids.dims3()?;
                let hn = head.norm(h)?.reshape((b * s, 1, ()))?; // (bs, 1, hidden)
                let w = head.weight();
                let cand = w.index_select(&ids.flatten_all()?, 0)?.reshape((b * s, k, ()))?; // (bs, k, hidden)
                // The head is frozen: no gradient for its rows.
                let frozen = crate::kernels::frozen_matmul;
                let pos_logits = frozen(&hn, &cand.transpose(1, 2)?)?.squeeze(1)?; // (bs, k)
                let neg_ids = Tensor::new(negatives, dev)?;
                let neg_logits = frozen(&hn.squeeze(1)?, &w.index_select(&neg_ids, 0)?.t()?)?; // (bs, n)
                let neg_logits = neg_logits.broadcast_add(neg_mask.as_ref().ok_or_else(|| Error::invalid("internal: no negatives"))?)?;
                let all = Tensor::cat(&[&pos_logits, &neg_logits], 1)?;
                let logp = candle_nn::ops::log_softmax(&all, D::Minus1)?.narrow(1, 0, k)?;
                logp.reshape((b, s, k))?
            };
            let ce = (&logp * &probs)?.sum(D::Minus1)?.neg()?; // (b, max)
            Ok(((ce * &mask)?.sum_all()? / positions as f64)?)
        };
        // What a conditioned adapter reads: the true middle outputs, perturbed with
        // `--feature-noise` (the output submodel's context then comes from `output_kv`, exact).
        let conditioning = match (&target, &output_kv) {
            (Some(m), Some(_)) if self.config.feature_noise > 0.0 && self.config.conditioned => Some(perturb(m, self.config.feature_noise, noise_seed)?),
            _ => target.clone(),
        };
        let (h, y) = adapter.draft_hidden_with(&output, &x, conditioning.as_ref(), output_kv.as_deref())?;
        let mut loss = token_loss(&h)?;
        // Later drafts of a round read the adapter's own predictions (training-time test).
        let mut drafted = y.clone();
        for _ in 1..self.config.draft_steps {
            let truth = conditioning.as_ref().ok_or_else(|| Error::invalid("internal: later drafts need the true middle outputs"))?;
            let (h, next) = adapter.next_draft_hidden(&output, &x, truth, &drafted, output_kv.as_deref())?;
            loss = (loss + token_loss(&h)?)?;
            drafted = next;
        }
        let mut loss = (loss / self.config.draft_steps as f64)?;
        if let (true, Some(target)) = (self.config.feature_weight > 0.0, &target) {
            // Per-position normalised squared error: |y - t|² / |t|².
            let err = (&y - target)?.sqr()?.sum(D::Minus1)?;
            let norm = (target.sqr()?.sum(D::Minus1)? + 1e-6)?;
            let feat = ((err / norm)? * &mask)?.sum_all()? / positions as f64;
            loss = (loss + (feat? * self.config.feature_weight)?)?;
        }
        Ok((loss, positions))
    }
}

/// `t` with zeros appended along `axis` up to length `n`.
fn pad_axis(t: &Tensor, axis: usize, n: usize) -> Result<Tensor> {
    let mut shape = t.dims().to_vec();
    let l = shape[axis];
    if l >= n {
        return Ok(t.clone());
    }
    shape[axis] = n - l;
    Ok(Tensor::cat(&[t, &Tensor::zeros(shape, t.dtype(), t.device())?], axis)?)
}

/// `m + σ · rms(m) · ε` for states `m` `(batch, len, hidden)`: `ε` standard normal (seeded
/// Box–Muller), `rms` each position's root mean square.
fn perturb(m: &Tensor, sigma: f64, seed: u64) -> Result<Tensor> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = m.elem_count();
    let mut eps = Vec::with_capacity(n + 1);
    while eps.len() < n {
        let (u, v): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        let r = (-2.0 * u.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * v;
        eps.push((r * a.cos()) as f32);
        eps.push((r * a.sin()) as f32);
    }
    eps.truncate(n);
    let eps = Tensor::from_vec(eps, m.shape(), m.device())?;
    let rms = m.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    Ok((m + eps.broadcast_mul(&(rms * sigma)?)?)?)
}

/// The top `k` entries of each row of `logits`, `(rows, vocab)`, with their softmax renormalised
/// over those `k`, sorted by decreasing probability: flat `(rows * k)` ids and probabilities.
fn top_k_softmax(logits: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let (mut ids, mut probs) = (Vec::with_capacity(rows.len() * k), Vec::with_capacity(rows.len() * k));
    for row in &rows {
        if row.len() < k || k == 0 {
            return Err(Error::invalid(format!("internal: top-{k} of a row of {} logits", row.len())));
        }
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        order.truncate(k);
        order.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let max = row[order[0] as usize];
        let e: Vec<f32> = order.iter().map(|&i| (row[i as usize] - max).exp()).collect();
        let z: f32 = e.iter().sum();
        ids.extend(&order);
        probs.extend(e.iter().map(|x| x / z));
    }
    Ok((ids, probs))
}

impl Sample {
    fn middle(&self) -> Result<&Tensor> {
        self.middle_hidden.as_ref().ok_or_else(|| Error::invalid("internal: the teacher kept no middle states"))
    }
}

/// `(positions, n)`: -inf where a negative is one of the position's own candidates.
fn negative_mask(ids: &Tensor, negatives: &[u32]) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = ids.flatten_to(1)?.to_vec2()?;
    let mut mask = Vec::with_capacity(rows.len() * negatives.len());
    for row in &rows {
        mask.extend(negatives.iter().map(|n| if row.contains(n) { f32::NEG_INFINITY } else { 0.0 }));
    }
    Ok(Tensor::from_vec(mask, (rows.len(), negatives.len()), &Device::Cpu)?)
}

/// The adapter's trainable weights, by checkpoint name (`adapter.layers.{i}.…`, `adapter.fuse.weight`).
pub struct AdapterWeights {
    pub vars: Vec<(String, Var)>,
    num_layers: usize,
    draft_context: DraftContext,
}

/// Decoder-layer tensor names (relative to the layer).
const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
const LAYER_BIASES: [&str; 3] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"];

impl AdapterWeights {
    /// Initial weights copied from the model's layers (`weights`: a VarBuilder of the whole model).
    /// A conditioned adapter's fuse projection starts as `[0 | I]`: the adapter starts as the
    /// unconditioned one and learns how much of the previous middle output to mix in.
    pub fn init(weights: &candle_nn::VarBuilder, cfg: &crate::config::ModelConfig, middle: std::ops::Range<usize>, n: usize, init: AdapterInit, conditioned: bool) -> Result<Self> {
        let mut vars = Vec::new();
        if conditioned {
            let eye = Tensor::eye(cfg.hidden_size, DType::F32, &Device::Cpu)?;
            vars.push((crate::adapter::FUSE.to_string(), Var::from_tensor(&Tensor::cat(&[&eye.zeros_like()?, &eye], 1)?)?));
        }
        let span = middle.end - middle.start;
        for j in 0..n {
            let src = match init {
                AdapterInit::Layer(l) => l,
                AdapterInit::Middle | AdapterInit::Identity => middle.start + ((2 * j + 1) * span) / (2 * n),
            };
            if src >= cfg.num_hidden_layers {
                return Err(Error::invalid(format!("--init layer:{src}: the model has {} layers", cfg.num_hidden_layers)));
            }
            let vb = weights.pp("model.layers").pp(src);
            let names = LAYER_TENSORS.iter().chain(if cfg.attention_bias { LAYER_BIASES.iter() } else { [].iter() });
            for name in names {
                let mut t = vb.get_unchecked_dtype(name, DType::F32)?;
                if init == AdapterInit::Identity && (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight")) {
                    t = t.zeros_like()?;
                }
                vars.push((format!("adapter.layers.{j}.{name}"), Var::from_tensor(&t)?));
            }
        }
        Ok(Self { vars, num_layers: n, draft_context: DraftContext::Drafted })
    }

    /// Sets what the output submodel attends to when the adapter drafts.
    pub fn with_draft_context(mut self, c: DraftContext) -> Self {
        self.draft_context = c;
        self
    }

    fn map(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    /// The adapter over the current weights (gradients flow to the vars).
    pub fn adapter(&self, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>, ops: Ops) -> Result<Adapter> {
        self.adapter_over(self.map(), manifest, rope, ops)
    }

    /// The adapter as a file in `storage` will hold it: the current weights, rounded the way
    /// [`AdapterWeights::save`] rounds them.
    pub fn stored_adapter(&self, storage: Storage, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>) -> Result<Adapter> {
        self.adapter_over(storage.round_trip(&self.map())?, manifest, rope, Ops::Fused)
    }

    fn adapter_over(&self, tensors: HashMap<String, Tensor>, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>, ops: Ops) -> Result<Adapter> {
        let conditioned = tensors.contains_key(crate::adapter::FUSE);
        let mut adapter = Adapter::from_tensors(tensors, self.num_layers, conditioned, manifest, rope, &Device::Cpu)?;
        adapter.layers = adapter.layers.with_ops(ops);
        adapter.draft_context = self.draft_context;
        adapter.split_id = Some(manifest.split_id.clone());
        Ok(adapter)
    }

    /// Saves the adapter file, its weights in `storage`.
    pub fn save(&self, path: &Path, manifest: &crate::split::Manifest, storage: Storage, training: &serde_json::Value) -> Result<()> {
        Adapter::save(path, &self.map(), manifest, self.num_layers, self.draft_context, storage, training)
    }
}

/// Checkpoint contents besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    config: TrainConfig,
    split_id: String,
    step: usize,
    elapsed_s: f64,
    curve: Vec<CurvePoint>,
    evals: Vec<Evaluation>,
    /// Missing in checkpoints of older versions (their steps then go untimed).
    #[serde(default)]
    timed: StepTotals,
}

fn checkpoint_paths(out: &Path) -> (PathBuf, PathBuf) {
    let base = out.with_extension("ckpt");
    (base.with_extension("ckpt.safetensors"), base.with_extension("ckpt.json"))
}

fn save_checkpoint(out: &Path, w: &AdapterWeights, opt: &AdamW, state: &CheckpointState) -> Result<()> {
    let (tensors_path, state_path) = checkpoint_paths(out);
    let mut t = HashMap::new();
    for (i, (name, var)) in w.vars.iter().enumerate() {
        t.insert(format!("var.{name}"), var.as_tensor().clone());
        t.insert(format!("m.{name}"), opt.m[i].clone());
        t.insert(format!("v.{name}"), opt.v[i].clone());
    }
    let tmp = tensors_path.with_extension("partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, &tensors_path).map_err(|e| Error::io(&tensors_path, e))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::bad_file(&state_path, e))?;
    std::fs::write(&state_path, text).map_err(|e| Error::io(&state_path, e))
}

fn load_checkpoint(out: &Path, w: &AdapterWeights, opt: &mut AdamW, config: &TrainConfig, split_id: &str) -> Result<CheckpointState> {
    let (tensors_path, state_path) = checkpoint_paths(out);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, format!("invalid checkpoint: {e}")))?;
    if state.split_id != split_id {
        return Err(Error::bad_file(&state_path, format!("checkpoint is for split {}, not {split_id}", state.split_id)));
    }
    let mut want = config.clone();
    want.time_budget_s = state.config.time_budget_s;
    want.steps = state.config.steps;
    want.storage = state.config.storage;
    if want != state.config {
        return Err(Error::bad_file(&state_path, "checkpoint was made with other settings (only --steps, --time-budget and --storage may change on --resume)"));
    }
    let t = candle_core::safetensors::load(&tensors_path, &Device::Cpu)?;
    let get = |k: String| t.get(&k).cloned().ok_or_else(|| Error::bad_file(&tensors_path, format!("checkpoint lacks {k}")));
    for (i, (name, var)) in w.vars.iter().enumerate() {
        var.set(&get(format!("var.{name}"))?)?;
        opt.m[i] = get(format!("m.{name}"))?;
        opt.v[i] = get(format!("v.{name}"))?;
    }
    opt.step = state.step;
    Ok(state)
}

/// The held-out side of a run: the teacher's view of the held-out conversations (for top-1
/// agreement) and the first `eval_prompts` of their prompts (for acceptance).
pub struct HeldOut {
    samples: Vec<Sample>,
    prompts: Vec<Vec<u32>>,
}

impl HeldOut {
    pub fn new(t: &Trainer, conversations: &[Conversation]) -> Result<Self> {
        let cfg = &t.config;
        let mut samples = Vec::new();
        for c in conversations {
            if let Some(ids) = sequence_ids(t.device, c, cfg.seq_len)? {
                samples.push(t.teach(&ids)?);
            }
        }
        let prompts = conversations
            .iter()
            .filter_map(|c| c.first_prompt())
            .take(cfg.eval_prompts)
            .map(|p| t.device.tokenizer.encode_prompt_within(p, true, cfg.seq_len))
            .collect::<Result<_>>()?;
        Ok(Self { samples, prompts })
    }
}

/// `hat train-adapter --evaluate`: the held-out evaluation of `adapter` on the `held_out`
/// conversations with `config`'s evaluation settings. How the adapter is conditioned and what it
/// drafts behind come from the adapter, whatever `config` says.
pub fn evaluate_adapter(model: &Model, device: &DeviceBundle, cloud: &CloudBundle, config: TrainConfig, held_out: &[Conversation], adapter: &Adapter) -> Result<Evaluation> {
    let config = TrainConfig { conditioned: adapter.is_conditioned(), draft_context: adapter.draft_context, ..config };
    let trainer = Trainer { model, device, cloud, config };
    let held = HeldOut::new(&trainer, held_out)?;
    evaluate(&trainer, adapter, &held, 0, 0.0)
}

/// Evaluates `adapter` on held-out data: top-1 agreement with the model (teacher-forced) and
/// mean accepted tokens per round at γ = `eval_draft_len`, greedy (the real decoding loop).
pub fn evaluate(t: &Trainer, adapter: &Adapter, held: &HeldOut, step: usize, elapsed: f64) -> Result<Evaluation> {
    let (mut agree, mut total) = (0usize, 0usize);
    for s in &held.samples {
        let x = s.input_hidden.unsqueeze(0)?;
        let middle = s.middle_hidden.as_ref().map(|m| m.unsqueeze(0)).transpose()?;
        let (y, _) = adapter.draft_hidden(&t.device.output, &x, middle.as_ref())?;
        let logits = t.device.head.forward(&y)?.squeeze(0)?;
        let student: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let teacher: Vec<u32> = s.top_ids.i((.., 0))?.to_vec1()?;
        agree += student.iter().zip(&teacher).filter(|(a, b)| a == b).count();
        total += student.len();
    }
    let opts = EdgeOptions {
        mode: Mode::Hat,
        draft_len: t.config.eval_draft_len,
        chunk_size: 0,
        sampling: SamplingParams::greedy(),
        max_tokens: t.config.eval_tokens,
        max_context: usize::MAX,
    };
    let (mut generated, mut rounds, mut sent, mut accepted) = (0usize, 0usize, 0usize, 0usize);
    let (mut checks, mut hits) = (vec![0usize; opts.draft_len], vec![0usize; opts.draft_len]);
    for ids in &held.prompts {
        let mut link = LocalMiddle::new(&t.cloud.middle, WireDtype::F16);
        let r = crate::edge::generate(t.device, adapter, &mut link, ids, &opts, |_| Ok(()))?;
        generated += r.generated_tokens.saturating_sub(1);
        rounds += r.rounds;
        sent += r.drafts_sent;
        accepted += r.drafts_accepted;
        for (i, (c, h)) in r.draft_checks.iter().zip(&r.draft_hits).enumerate() {
            checks[i] += c;
            hits[i] += h;
        }
    }
    Ok(Evaluation {
        step,
        elapsed_s: elapsed,
        top1_agreement: if total > 0 { agree as f64 / total as f64 } else { 0.0 },
        mean_accepted: if rounds > 0 { generated as f64 / rounds as f64 } else { 0.0 },
        acceptance_rate: if sent > 0 { accepted as f64 / sent as f64 } else { 0.0 },
        acceptance_by_position: checks.iter().zip(&hits).map(|(&c, &h)| if c > 0 { h as f64 / c as f64 } else { 0.0 }).collect(),
    })
}

/// Batches drawn together into a pool whose sequences are sorted by length (see [`epoch_batches`]).
const LENGTH_POOL: usize = 32;

/// The batches of one epoch, as indices into the samples (of `lengths` tokens each): a shuffle
/// seeded by `(seed, epoch)`, cut into pools of [`LENGTH_POOL`] batches, each pool sorted by length
/// and cut into batches (so a batch's sequences have about the same length and little padding),
/// and the batches shuffled. `lengths.len().div_ceil(batch)` batches; every sample once.
pub fn epoch_batches(lengths: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let batch = batch.max(1);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch));
    for pool in order.chunks_mut(batch * LENGTH_POOL) {
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Prompts below this many tokens are not cut to a shorter length bucket.
const PROMPT_BUCKET: usize = 16;

/// The self-distillation samples of a run: the first prompts of `train`, fitted into
/// `seq_len - self_distill_tokens + 1` tokens and cut down to a multiple of [`PROMPT_BUCKET`] (by
/// dropping the end of the prompt's text, never the chat template) so that prompts batch
/// together. Loaded from `cache` when it holds this exact data, else generated and saved there.
fn distilled_samples(t: &Trainer, train: &[Conversation], cache: Option<&Path>, pb: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
    let cfg = &t.config;
    let tok = &t.device.tokenizer;
    let cap = (cfg.seq_len + 1).saturating_sub(cfg.self_distill_tokens);
    let mut prompts = Vec::new();
    for p in train.iter().filter_map(|c| c.first_prompt()) {
        let n = tok.encode_prompt(p, true)?.len().min(cap);
        let bucket = n / PROMPT_BUCKET * PROMPT_BUCKET;
        let ids = match tok.encode_prompt_within(p, true, bucket) {
            Ok(ids) => ids,
            Err(_) => tok.encode_prompt_within(p, true, n)?,
        };
        if ids.len() >= 8 {
            prompts.push(ids);
        }
    }
    if prompts.is_empty() {
        return Err(Error::invalid(format!(
            "no training prompt fits in --seq-len {} with {} self-distilled tokens",
            cfg.seq_len, cfg.self_distill_tokens
        )));
    }
    let mut digest = format!("{}|{}|{}|{}|{}", t.device.manifest.split_id, cfg.self_distill_tokens, t.top_k(), cfg.keeps_middle(), cfg.self_distill_batch);
    for p in &prompts {
        digest.push_str(&format!("|{p:?}"));
    }
    let key = crate::digest::sha256(digest.as_bytes());
    if let Some(path) = cache {
        if let Some(samples) = load_samples(path, &key)? {
            crate::progress::say(pb, format!("self-distill: {} sequences loaded from {}", samples.len(), path.display()));
            return Ok(samples);
        }
    }
    let samples = t.self_distill(&prompts, cfg.self_distill_tokens, cfg.self_distill_batch, pb)?;
    if let Some(path) = cache {
        save_samples(path, &key, &samples)?;
    }
    Ok(samples)
}

/// Writes samples as one safetensors file: each field concatenated over all sequences, their
/// `lengths`, and `key` (what they were made from).
fn save_samples(path: &Path, key: &str, samples: &[Sample]) -> Result<()> {
    let dev = &Device::Cpu;
    let cat = |f: &dyn Fn(&Sample) -> Tensor| -> Result<Tensor> { Ok(Tensor::cat(&samples.iter().map(f).collect::<Vec<_>>(), 0)?) };
    let mut t = HashMap::new();
    t.insert("key".to_string(), Tensor::new(key.as_bytes(), dev)?);
    t.insert("lengths".to_string(), Tensor::new(samples.iter().map(|s| s.ids.len() as u32).collect::<Vec<_>>(), dev)?);
    t.insert("ids".to_string(), Tensor::new(samples.iter().flat_map(|s| s.ids.iter().copied()).collect::<Vec<_>>(), dev)?);
    t.insert("input_hidden".to_string(), cat(&|s| s.input_hidden.clone())?);
    t.insert("top_ids".to_string(), cat(&|s| s.top_ids.clone())?);
    t.insert("top_probs".to_string(), cat(&|s| s.top_probs.clone())?);
    let middle: Option<Vec<Tensor>> = samples.iter().map(|s| s.middle_hidden.clone()).collect();
    if let Some(m) = middle {
        t.insert("middle_hidden".to_string(), Tensor::cat(&m, 0)?);
    }
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads [`save_samples`]'s file; `None` when it is missing or holds other data than `key`.
fn load_samples(path: &Path, key: &str) -> Result<Option<Vec<Sample>>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let bad = |what: &str| Error::bad_file(path, format!("self-distillation cache: {what}"));
    let get = |name: &str| t.get(name).ok_or_else(|| bad(&format!("no {name}")));
    if get("key")?.to_vec1::<u8>()? != key.as_bytes() {
        return Ok(None);
    }
    let lengths: Vec<u32> = get("lengths")?.to_vec1()?;
    let ids: Vec<u32> = get("ids")?.to_vec1()?;
    let (input, top_ids, top_probs) = (get("input_hidden")?, get("top_ids")?, get("top_probs")?);
    let middle = t.get("middle_hidden");
    let total: usize = lengths.iter().map(|&l| l as usize).sum();
    if ids.len() != total || input.dim(0)? != total || top_ids.dim(0)? != total || top_probs.dim(0)? != total || middle.is_some_and(|m| m.dims()[0] != total) {
        return Err(bad("lengths do not add up"));
    }
    let mut start = 0;
    let mut samples = Vec::with_capacity(lengths.len());
    for &l in &lengths {
        let l = l as usize;
        samples.push(Sample {
            ids: ids[start..start + l].to_vec(),
            input_hidden: input.narrow(0, start, l)?,
            middle_hidden: middle.map(|m| m.narrow(0, start, l)).transpose()?,
            top_ids: top_ids.narrow(0, start, l)?,
            top_probs: top_probs.narrow(0, start, l)?,
            output_kv: None,
        });
        start += l;
    }
    Ok(Some(samples))
}

/// Inputs of a training run.
pub struct TrainRun<'a> {
    pub trainer: Trainer<'a>,
    /// Full model weights (for the initial adapter).
    pub weights: candle_nn::VarBuilder<'static>,
    pub train: Vec<Conversation>,
    pub held_out: Vec<Conversation>,
    /// Where self-distilled samples are kept between runs (`--resume` reuses them); `None`: not kept.
    pub self_distill_cache: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint, as if interrupted) once this many steps are done.
    pub stop_at_step: Option<usize>,
    pub progress: indicatif::ProgressBar,
}

/// Trains, checkpointing every `checkpoint_every` steps and when stopped; writes the adapter and
/// `OUT.report.json`.
pub fn train(run: TrainRun) -> Result<TrainReport> {
    let t = &run.trainer;
    let cfg = &t.config;
    cfg.validate()?;
    let manifest = &t.device.manifest;
    let mcfg = &manifest.config;

    // Teacher pass (once).
    let started = Instant::now();
    let pb = &run.progress;
    let mut samples: Vec<Sample> = if cfg.self_distill_tokens > 0 {
        distilled_samples(t, &run.train, run.self_distill_cache.as_deref(), pb)?
    } else {
        let ids = run.train.iter().map(|c| sequence_ids(t.device, c, cfg.seq_len)).collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = ids.into_iter().flatten().collect();
        if ids.is_empty() {
            return Err(Error::invalid("the data set has no usable training conversation (a user prompt of at least 8 tokens)"));
        }
        pb.set_length(ids.len() as u64);
        pb.set_position(0);
        pb.set_message("teacher");
        ids.iter().map(|ids| t.teach(ids).inspect(|_| pb.inc(1))).collect::<Result<_>>()?
    };
    if cfg.draft_context == DraftContext::Verified {
        // Drafts attend to the output submodel's states over the true middle outputs: the same
        // every step, so computed once here.
        pb.set_length(samples.len() as u64);
        pb.set_position(0);
        pb.set_message("verified context");
        for s in &mut samples {
            s.output_kv = Some(t.device.output.keys_values(&s.middle()?.unsqueeze(0)?)?);
            pb.inc(1);
        }
    }
    let held = HeldOut::new(t, &run.held_out)?;
    let teacher_seconds = started.elapsed().as_secs_f64();
    let train_tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    crate::progress::say(
        pb,
        format!("teacher: {} training sequences ({train_tokens} tokens) and {} held-out in {teacher_seconds:.0} s", samples.len(), held.samples.len()),
    );
    // Student and optimiser.
    let weights = AdapterWeights::init(&run.weights, mcfg, manifest.plan.middle_range(), cfg.adapter_layers, cfg.init, cfg.conditioned)?.with_draft_context(cfg.draft_context);
    let eval_at = |step: usize, elapsed: f64| evaluate(t, &weights.adapter(manifest, t.device.rope.clone(), Ops::Fused)?, &held, step, elapsed);
    let mut opt = AdamW::new(weights.vars.iter().map(|(n, v)| (n.clone(), v.clone())).collect())?;
    let mut state = CheckpointState { config: cfg.clone(), split_id: manifest.split_id.clone(), step: 0, elapsed_s: 0.0, curve: vec![], evals: vec![], timed: StepTotals::default() };
    if run.resume {
        state = load_checkpoint(&run.out, &weights, &mut opt, cfg, &manifest.split_id)?;
        state.config = cfg.clone();
    }
    // `state.elapsed_s` counts training steps only: evaluations and checkpoints are not part of
    // the time budget (or of the learning-rate schedule it paces).
    let per_epoch = samples.len().div_ceil(cfg.batch_size);
    let lengths: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    let mut batches: Option<(usize, Vec<Vec<usize>>)> = None;
    pb.set_length(cfg.steps as u64);
    pb.set_position(state.step as u64);
    pb.set_message("training");
    let mut stopped_by = "steps".to_string();
    if !run.resume {
        state.evals.push(eval_at(0, 0.0)?);
    }
    while state.step < cfg.steps {
        if run.stop.load(Ordering::Relaxed) || run.stop_at_step.is_some_and(|s| state.step >= s) {
            stopped_by = "interrupted".into();
            break;
        }
        if cfg.time_budget_s.is_some_and(|b| state.elapsed_s >= b) {
            stopped_by = "time budget".into();
            break;
        }
        let step_started = Instant::now();
        let (epoch, slot) = (state.step / per_epoch, state.step % per_epoch);
        if batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
            batches = Some((epoch, epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch)));
        }
        let batch: Vec<&Sample> = batches.as_ref().map_or(&[][..], |(_, b)| b[slot].as_slice()).iter().map(|&i| &samples[i]).collect();

        let lr = cfg.lr_at(state.step, state.elapsed_s);
        let t0 = Instant::now();
        let mut neg_rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(0x9e37).wrapping_add(state.step as u64));
        let negatives: Vec<u32> = rand::seq::index::sample(&mut neg_rng, mcfg.vocab_size, cfg.negatives.min(mcfg.vocab_size)).into_iter().map(|i| i as u32).collect();
        let adapter = weights.adapter(manifest, t.device.rope.clone(), Ops::Differentiable)?;
        let (loss, positions) = t.batch_loss(&adapter, &batch, &negatives, cfg.seed.wrapping_add(0x5bd1).wrapping_mul(1_000_003).wrapping_add(state.step as u64))?;
        let t1 = Instant::now();
        let mut grads = loss.backward()?;
        let t2 = Instant::now();
        let f = clip_factor(&grads, &weights.vars, cfg.clip)?;
        scale_grads(&mut grads, &weights.vars, f)?;
        opt.update(&grads, lr, cfg.weight_decay)?;
        let t3 = Instant::now();
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(Error::invalid(format!("training diverged at step {} (loss {loss_v}); try a lower --lr", state.step)));
        }
        let timed = &mut state.timed;
        timed.student_forward_ms += (t1 - t0).as_secs_f64() * 1e3;
        timed.backward_ms += (t2 - t1).as_secs_f64() * 1e3;
        timed.optimizer_ms += (t3 - t2).as_secs_f64() * 1e3;
        timed.steps += 1;
        timed.tokens += positions;
        state.step += 1;
        state.elapsed_s += step_started.elapsed().as_secs_f64();
        state.curve.push(CurvePoint { step: state.step, elapsed_s: state.elapsed_s, loss: loss_v, lr, tokens: positions });
        pb.set_position(state.step as u64);
        pb.set_message(format!("loss {loss_v:.3} lr {lr:.1e} {:.0} tok/s", state.timed.means().tokens_per_s));
        if state.step % cfg.eval_every == 0 && state.step < cfg.steps {
            let e = eval_at(state.step, state.elapsed_s)?;
            let by_position: Vec<String> = e.acceptance_by_position.iter().map(|a| format!("{:.0}%", a * 100.0)).collect();
            crate::progress::say(
                pb,
                format!("step {}: top-1 agreement {:.1}%, mean accepted {:.2} tokens/round (drafts accepted by position: {})", e.step, e.top1_agreement * 100.0, e.mean_accepted, by_position.join(" ")),
            );
            state.evals.push(e);
        }
        if state.step % cfg.checkpoint_every == 0 {
            let recent = &state.curve[state.curve.len().saturating_sub(cfg.checkpoint_every)..];
            let mean = recent.iter().map(|p| p.loss).sum::<f64>() / recent.len().max(1) as f64;
            crate::progress::say(pb, format!("step {}: mean loss {mean:.3} over the last {} steps, {:.0} s, checkpoint saved", state.step, recent.len(), state.elapsed_s));
            save_checkpoint(&run.out, &weights, &opt, &state)?;
        }
    }
    save_checkpoint(&run.out, &weights, &opt, &state)?;
    // The final evaluation is of the weights as the adapter file stores them.
    if state.evals.last().map(|e| e.step) == Some(state.step) {
        state.evals.pop();
    }
    let stored = weights.stored_adapter(cfg.storage, manifest, t.device.rope.clone())?;
    state.evals.push(evaluate(t, &stored, &held, state.step, state.elapsed_s)?);
    pb.finish_with_message("done");
    let report = TrainReport {
        config: cfg.clone(),
        split_id: manifest.split_id.clone(),
        train_sequences: samples.len(),
        train_tokens,
        held_out_sequences: held.samples.len(),
        teacher_seconds,
        curve: state.curve.clone(),
        evals: state.evals.clone(),
        steps_done: state.step,
        stopped_by,
        time_per_step_ms: state.timed.means(),
    };
    let training = serde_json::json!({
        "config": cfg, "steps_done": state.step, "final_eval": state.evals.last(), "train_tokens": train_tokens,
    });
    weights.save(&run.out, manifest, cfg.storage, &training)?;
    let report_path = run.out.with_extension("report.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::bad_file(&report_path, e))?;
    std::fs::write(&report_path, text).map_err(|e| Error::io(&report_path, e))?;
    Ok(report)
}
