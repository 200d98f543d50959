//! `hat audit`: an honest-but-curious cloud, measured. What can a cloud recover of a conversation
//! from the hidden states it sees?
//!
//! Built so far: the attacks of a cloud that holds the model's public weights (the usual case).
//! - **Replay inversion of the uplink** (`up`): for each position, candidate tokens are run
//!   through the public input submodel after the prefix recovered so far (all candidates of a
//!   position in one block, each seeing the prefix and itself), rounded as the wire rounds them,
//!   and the closest state wins. Candidates come ranked by what the attacker learns from its own
//!   text through the same public layers: a linear probe from states to tokens, and every
//!   token's state at position 0.
//! - **The public head on the downlink** (`down`): the public output submodel and head on the
//!   middle outputs give the model's next-token distribution at every position: generated
//!   tokens (greedy answers exactly) and prompt tokens as far as the model predicts them.
//!
//! And the learned inverters of a cloud **without** the device's weights ([`learned`]): the
//! nearest embedding row, a linear probe and a small network over a window of states, trained on
//! the attacker's own (state, token) pairs with growing budgets.
//!
//! Each attack runs under each [`defence`] asked for (none, noise on the uplink, a secret
//! rotation, secret input-layer weights, a private fine-tune of them), with what the defence costs: the agreement of the
//! device's next token with the model's, and the device's compute per token at each K1.
//!
//! Counts are over content tokens only (the chat template's are known to everyone), beside a
//! unigram baseline (always guessing the most frequent content token).
//!
//! May use [`crate::model`], [`crate::io`], [`crate::decode`], [`crate::net`] (wire rounding) and
//! [`crate::util`]; only the commands use it.

pub mod defence;
pub mod finetune;
pub mod learned;
pub mod plot;

use std::sync::Arc;

use candle_core::{IndexOp, Tensor, D};
use serde::Serialize;

pub use defence::Defence;
use defence::Guard;

use crate::decode::{generate, ModelDecoder, SamplingParams};
use crate::error::{Error, Result};
use crate::io::dataset::Conversation;
use crate::io::tokenizer::{HatTokenizer, Message};
use crate::model::tree::{TreeMask, MAX_TREE_NODES};
use crate::model::{LayerStack, Model};
use crate::net::protocol::WireDtype;

/// What the audit runs.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Device layers before the cloud (K1), one audit each.
    pub input_layers: Vec<usize>,
    /// Device layers after the cloud (K2).
    pub output_layers: usize,
    /// Most content tokens of each prompt.
    pub prompt_tokens: usize,
    /// Tokens of each greedy reply.
    pub reply_tokens: usize,
    /// How states are rounded on the wire.
    pub wire: WireDtype,
    /// Candidates the replay inversion checks per position (by cosine to the embedding rows).
    pub candidates: usize,
    /// Defences to audit under (each K1 × each defence).
    pub defences: Vec<Defence>,
    /// How `finetune=S` trains the devices' input layers.
    pub finetune: finetune::FineTune,
}

/// One conversation as the cloud would see it: the tokens, and which of them are content.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ids: Vec<u32>,
    /// Per position: a content token (the user's text or the reply), not the template's.
    pub content: Vec<bool>,
}

/// One attack's recovery.
#[derive(Debug, Clone, Serialize)]
pub struct AuditResult {
    pub attack: &'static str,
    pub direction: &'static str,
    pub input_layers: usize,
    pub inverter: &'static str,
    /// The defence in place ([`Defence::name`]).
    pub defence: String,
    /// Fraction of content tokens recovered as the best guess, and among the ten best.
    pub top1: f64,
    pub top10: f64,
    pub tokens: usize,
    /// Learned inverters: the attacker's (state, token) pairs they were trained on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_tokens: Option<usize>,
}

/// The conversations as samples: the first user turn through the chat template (cut to
/// `prompt_tokens` of content), then the model's greedy reply.
pub fn samples(model: &Model, tokenizer: &HatTokenizer, conversations: &[Conversation], opts: &AuditOptions) -> Result<Vec<Sample>> {
    // Every split is checked before any reply is generated.
    for &k1 in &opts.input_layers {
        split(model, k1, opts.output_layers)?;
    }
    let template = tokenizer.chat_template.as_ref().ok_or_else(|| Error::invalid("the audit needs a model with a chat template"))?;
    let frame = tokenizer.encode(&template.render(&[Message::user("")], true)?)?;
    let mut out = Vec::new();
    for c in conversations {
        let Some(prompt) = c.first_prompt().filter(|p| !p.trim().is_empty()) else { continue };
        let ids = tokenizer.encode_prompt_within(prompt, true, frame.len() + opts.prompt_tokens)?;
        // The template around the content: the common prefix and suffix with an empty message.
        let head = ids.iter().zip(&frame).take_while(|(a, b)| a == b).count();
        let tail = ids.iter().rev().zip(frame.iter().rev()).take_while(|(a, b)| a == b).count().min(ids.len() - head);
        let mut content: Vec<bool> = (0..ids.len()).map(|i| i >= head && i < ids.len() - tail).collect();
        let reply = generate(&mut ModelDecoder::new(model), &ids, opts.reply_tokens, &SamplingParams::greedy(), &tokenizer.eos_token_ids, |_| Ok(()))?.token_ids;
        content.extend(reply.iter().map(|t| !tokenizer.is_eos(*t)));
        let mut all = ids;
        all.extend(reply);
        out.push(Sample { ids: all, content });
    }
    if out.is_empty() {
        return Err(Error::invalid("no conversation with a user turn to audit"));
    }
    Ok(out)
}

/// The first `k1` layers, the middle, and the last `k2` of `model`.
fn split(model: &Model, k1: usize, k2: usize) -> Result<(LayerStack, LayerStack, LayerStack)> {
    let l = model.config.num_hidden_layers;
    if k1 == 0 || k2 == 0 || k1 + k2 >= l {
        return Err(Error::invalid(format!("input layers {k1} and output layers {k2} do not split a model of {l} layers (each at least 1, the middle not empty)")));
    }
    Ok((model.layers.slice(0..k1)?, model.layers.slice(k1..l - k2)?, model.layers.slice(l - k2..l)?))
}

/// Hits among the content tokens: `(top-1, top-10, counted)`.
#[derive(Debug, Default, Clone, Copy)]
struct Hits(usize, usize, usize);

impl Hits {
    fn add(&mut self, other: Hits) {
        *self = Hits(self.0 + other.0, self.1 + other.1, self.2 + other.2);
    }

    fn result(self, direction: &'static str, k1: usize, inverter: &'static str, defence: Defence) -> AuditResult {
        let f = |n: usize| if self.2 == 0 { 0.0 } else { n as f64 / self.2 as f64 };
        AuditResult { attack: "public-weights", direction, input_layers: k1, inverter, defence: defence.name(), top1: f(self.0), top10: f(self.1), tokens: self.2, train_tokens: None }
    }
}

/// What the attacker learns from its own text through the public input submodel, to rank the
/// candidates of a position: a linear probe from states to tokens (ridge regression onto one-hot
/// targets, positions after the first), and the state of every token at position 0 (the first
/// position sees nothing before it, so its state names its token).
struct Ranker {
    /// `(hidden, vocab)`: a state's scores.
    probe: Tensor,
    /// `(vocab, hidden)`: every token's state at position 0, rounded as the wire rounds it.
    first: Tensor,
}

impl Ranker {
    /// Every token's state at position 0 through `input`, rounded as the wire rounds it, `(vocab,
    /// hidden)`: the same for every defence of a split.
    fn first_states(model: &Model, input: &LayerStack, wire: WireDtype) -> Result<Tensor> {
        let hidden = model.config.hidden_size;
        let vocab = model.embedder.weight().dim(0)?;
        let mut first = Vec::new();
        for chunk in (0..vocab as u32).collect::<Vec<_>>().chunks(1024) {
            let x = model.embedder.embed_ids(chunk)?.reshape((chunk.len(), 1, hidden))?;
            first.push(wire.round_trip(&input.forward(&x, 0, &mut input.new_cache())?)?.squeeze(1)?);
        }
        Ok(Tensor::cat(&first, 0)?)
    }

    /// `own`: the attacker's reading of the states of its own texts, `(n, hidden)` each; `first`:
    /// [`Ranker::first_states`].
    fn fit(model: &Model, texts: &[Vec<u32>], own: &[Tensor], first: Tensor) -> Result<Self> {
        let vocab = model.embedder.weight().dim(0)?;
        let (mut states, mut tokens) = (Vec::new(), Vec::new());
        for (ids, h) in texts.iter().zip(own) {
            states.push(h.narrow(0, 1, ids.len() - 1)?);
            tokens.extend_from_slice(&ids[1..]);
        }
        if tokens.is_empty() {
            return Err(Error::invalid("no text to fit the attacker's probe on"));
        }
        let probe = learned::ridge_probe(&Tensor::cat(&states, 0)?, &tokens, vocab)?; // (hidden, vocab)
        Ok(Self { probe, first })
    }

    /// Token ids, most likely first, for the state `target` `(hidden,)` at position `t`.
    fn rank(&self, target: &Tensor, t: usize) -> Result<Vec<u32>> {
        let scores = if t == 0 {
            self.first.broadcast_sub(&target.unsqueeze(0)?)?.sqr()?.sum(D::Minus1)?.neg()?
        } else {
            target.unsqueeze(0)?.matmul(&self.probe)?.squeeze(0)?
        };
        Ok(scores.arg_sort_last_dim(false)?.to_vec1::<u32>()?)
    }
}

/// The replay inversion of one sample's uplink through `input` (see the module doc), from the
/// attacker's reading `seen` `(n, hidden)` of it.
fn replay(model: &Model, input: &LayerStack, ranker: &Ranker, sample: &Sample, seen: &Tensor, opts: &AuditOptions) -> Result<Hits> {
    let n = sample.ids.len();
    let mut cache = input.new_cache();
    let mut hits = Hits::default();
    for t in 0..n {
        let target = seen.i(t)?; // (hidden,)
        let ranked = ranker.rank(&target, t)?;
        let mut scored: Vec<(f32, u32)> = Vec::new();
        let target_norm = target.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12);
        for block in ranked[..opts.candidates.min(ranked.len())].chunks(MAX_TREE_NODES) {
            let c = block.len();
            // Each candidate sees the prefix and itself, at position t.
            let mask = Arc::new(TreeMask { prefix: t, visible: (0..c).map(|i| vec![t + i]).collect(), positions: vec![t; c] });
            let h = input.forward_tree(&model.embedder.embed_ids(block)?, &mut cache, mask);
            cache.truncate(t);
            let h = opts.wire.round_trip(&h?)?.squeeze(0)?; // (c, hidden)
            let dist = h.broadcast_sub(&target.unsqueeze(0)?)?.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1::<f32>()?;
            scored.extend(dist.iter().map(|d| d / target_norm).zip(block.iter().copied()));
            // A state that matches to the wire's rounding ends the search.
            if scored.iter().any(|&(d, _)| d < 1e-3) {
                break;
            }
        }
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        let best = scored.first().map_or(ranked[0], |s| s.1);
        if sample.content[t] {
            let truth = sample.ids[t];
            hits.add(Hits(usize::from(best == truth), usize::from(scored.iter().take(10).any(|s| s.1 == truth)), 1));
        }
        // The attacker goes on from what it recovered.
        input.forward(&model.embedder.embed_ids(&[best])?, t, &mut cache)?;
    }
    Ok(hits)
}

/// One sample through the split under `guard`: the public head on the attacker's reading of the
/// downlink (see the module doc), and the agreement of the device's next token with the model's
/// at every position, `(agreeing, positions)`. `sent`: the uplink as it left the device; `truth`:
/// the model's own next token at every position.
fn downlink(model: &Model, output: &LayerStack, guard: &Guard, sample: &Sample, sent: &Tensor, truth: &[u32]) -> Result<(Hits, (usize, usize))> {
    let down = guard.middle(sent)?;
    let read = |h: &Tensor| -> Result<Tensor> { Ok(model.head.forward(&output.forward(h, 0, &mut output.new_cache())?)?.squeeze(0)?) }; // (n, vocab)
    let ranked = read(&guard.attacker_reads(&down)?)?.arg_sort_last_dim(false)?;
    let mut hits = Hits::default();
    for t in 1..sample.ids.len() {
        if sample.content[t] {
            let top: Vec<u32> = ranked.i((t - 1, 0..10))?.to_vec1()?;
            hits.add(Hits(usize::from(top[0] == sample.ids[t]), usize::from(top.contains(&sample.ids[t])), 1));
        }
    }
    let device: Vec<u32> = read(&guard.device_reads(&down)?)?.argmax(D::Minus1)?.to_vec1()?;
    let agree = device.iter().zip(truth).filter(|(a, b)| a == b).count();
    Ok((hits, (agree, truth.len())))
}

/// The unigram baseline: always guessing the most frequent content token.
pub fn unigram_baseline(samples: &[Sample]) -> f64 {
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    let mut total = 0;
    for s in samples {
        for (&t, &c) in s.ids.iter().zip(&s.content) {
            if c {
                *counts.entry(t).or_default() += 1;
                total += 1;
            }
        }
    }
    counts.values().max().map_or(0.0, |&m| m as f64 / total.max(1) as f64)
}

/// What a defence costs on one split.
#[derive(Debug, Clone, Serialize)]
pub struct DefenceCost {
    pub input_layers: usize,
    pub defence: String,
    /// Fraction of positions of the audited texts whose next token on the device (argmax) is the
    /// model's (1 up to the wire's rounding without noise).
    pub agreement: f64,
    /// The device's compute per decoded token at this K1 (input layers, output layers and head,
    /// one position after 128 cached), median, ms.
    pub device_ms_per_token: f64,
    /// `rotation`: the largest error of the attacker's estimate of the rotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_error: Option<f32>,
    /// `finetune=S`: the victim's fine-tune loss (KL divergence from the model's distribution,
    /// nats per position) over its first and last fifth of the steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune_loss: Option<[f64; 2]>,
}

/// Everything the audit measured.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub results: Vec<AuditResult>,
    pub costs: Vec<DefenceCost>,
}

/// Salts of the uplink noise: one per audited sample, one per text of the attacker's own.
const OWN_TEXT_SALT: u64 = 1 << 32;

/// The steps [`run`] announces for `samples` samples: for each K1, the input layers' states of
/// every text; then for each defence, the attacker's reading of its own states (and its replay's
/// ranker), each sample, and each learned inverter it trains.
pub fn steps(samples: usize, opts: &AuditOptions) -> u64 {
    let finetunes = opts.defences.iter().filter(|d| matches!(d, Defence::PrivateFineTune { .. })).count();
    (opts.input_layers.len() * (1 + opts.defences.len() * (1 + samples + 2 * BUDGETS.len()) + 2 * finetunes)) as u64
}

/// Runs every attack for every K1 and defence (`attacker_texts`: token ids of the attacker's own
/// text, to train its inverters and rank its replay's candidates); `step` names each of the
/// [`steps`] as it begins.
pub fn run(model: &Model, samples: &[Sample], attacker_texts: &[Vec<u32>], opts: &AuditOptions, step: &mut dyn FnMut(&str)) -> Result<Audit> {
    if opts.candidates == 0 {
        return Err(Error::invalid("--candidates must be at least 1"));
    }
    if opts.defences.is_empty() {
        return Err(Error::invalid("give at least one defence (none for the states as hat sends them)"));
    }
    let attacker_texts: Vec<Vec<u32>> = attacker_texts.iter().filter(|t| t.len() > 1).cloned().collect();
    let attacker_texts = attacker_texts.as_slice();
    // The model's own next token at every position of each sample, for the agreement.
    let truth = samples.iter().map(|s| Ok(model.forward_all(&s.ids, &mut model.new_cache())?.squeeze(0)?.argmax(D::Minus1)?.to_vec1::<u32>()?)).collect::<Result<Vec<_>>>()?;
    let (mut results, mut costs) = (Vec::new(), Vec::new());
    for &k1 in &opts.input_layers {
        let (input, middle, output) = split(model, k1, opts.output_layers)?;
        let device_ms_per_token = device_ms_per_token(model, &input, &output)?;
        // The input submodel's states, `(1, n, hidden)`, of the attacker's texts and the samples,
        // and the ranker's position-0 states: computed once per split, whatever the defence.
        step(&format!("K1 = {k1}: the input layers' states"));
        let states = |layers: &LayerStack, ids: &[u32]| layers.forward(&model.embedder.embed_ids(ids)?, 0, &mut layers.new_cache());
        let own_states = attacker_texts.iter().map(|ids| states(&input, ids)).collect::<Result<Vec<_>>>()?;
        let sample_states = samples.iter().map(|s| states(&input, &s.ids)).collect::<Result<Vec<_>>>()?;
        let first = Ranker::first_states(model, &input, opts.wire)?;
        for &defence in &opts.defences {
            let at = format!("K1 = {k1}, {}", defence.name());
            step(&format!("{at}: the attacker's own states and ranker"));
            let guard = Guard::new(defence, model, &input, &middle, opts.wire, 0x5EC, attacker_texts, opts.finetune, &mut |what| step(&format!("{at}: {what}")))?;
            // Secret input weights: the victim's and the attacker's own states come from them.
            let (own_states, sample_states) = match guard.secret_inputs() {
                Some((device, attacker)) => (
                    attacker_texts.iter().map(|ids| states(attacker, ids)).collect::<Result<Vec<_>>>()?,
                    samples.iter().map(|s| states(device, &s.ids)).collect::<Result<Vec<_>>>()?,
                ),
                None => (own_states.clone(), sample_states.clone()),
            };
            let own = own_states.iter().enumerate().map(|(i, h)| guard.attacker_reads(&guard.send(h, OWN_TEXT_SALT + i as u64)?)?.squeeze(0).map_err(Into::into)).collect::<Result<Vec<_>>>()?;
            let ranker = Ranker::fit(model, attacker_texts, &own, first.clone())?;
            let (mut up, mut down, mut agree) = (Hits::default(), Hits::default(), (0, 0));
            let mut audited = Vec::new();
            for (i, s) in samples.iter().enumerate() {
                step(&format!("{at}: conversation {}/{}", i + 1, samples.len()));
                let sent = guard.send(&sample_states[i], i as u64)?;
                let seen = guard.attacker_reads(&sent)?.squeeze(0)?; // (n, hidden)
                up.add(replay(model, &input, &ranker, s, &seen, opts)?);
                let (hits, (a, n)) = downlink(model, &output, &guard, s, &sent, &truth[i])?;
                down.add(hits);
                agree = (agree.0 + a, agree.1 + n);
                audited.push(seen);
            }
            results.push(up.result("up", k1, "replay", defence));
            results.push(down.result("down", k1, "public-head", defence));
            results.extend(learned_attacks(model, samples, &audited, attacker_texts, &own, k1, defence, &mut |what| step(&format!("{at}: {what}")))?);
            costs.push(DefenceCost {
                input_layers: k1,
                defence: defence.name(),
                agreement: agree.0 as f64 / agree.1.max(1) as f64,
                device_ms_per_token,
                rotation_error: guard.rotation_error()?,
                finetune_loss: guard.finetunes().map(|(victim, _)| [victim.loss_first, victim.loss_last]),
            });
        }
    }
    Ok(Audit { results, costs })
}

/// The device's compute per decoded token: input layers, output layers and head on one position
/// after 128 cached, median of 15, ms.
fn device_ms_per_token(model: &Model, input: &LayerStack, output: &LayerStack) -> Result<f64> {
    const CONTEXT: usize = 128;
    let ids: Vec<u32> = (0..CONTEXT as u32 + 1).map(|i| 100 + i).collect();
    let (mut ic, mut oc) = (input.new_cache(), output.new_cache());
    let h = input.forward(&model.embedder.embed_ids(&ids[..CONTEXT])?, 0, &mut ic)?;
    output.forward(&h, 0, &mut oc)?;
    let mut times = Vec::new();
    for _ in 0..15 {
        let start = std::time::Instant::now();
        let h = input.forward(&model.embedder.embed_ids(&ids[CONTEXT..])?, CONTEXT, &mut ic)?;
        model.head.forward(&output.forward(&h, CONTEXT, &mut oc)?)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        ic.truncate(CONTEXT);
        oc.truncate(CONTEXT);
    }
    Ok(crate::util::stats::median(&times))
}

/// Shares of the attacker's pairs the learned inverters are trained on (its budget).
pub const BUDGETS: [f64; 2] = [0.1, 1.0];

/// The learned inverters on the uplink at K1 = `k1`, from the attacker's readings `(n, hidden)`
/// of the audited samples (`seen`) and of its own texts (`own_seen`); `step` names each
/// inverter trained as it begins.
#[allow(clippy::too_many_arguments)]
fn learned_attacks(model: &Model, samples: &[Sample], seen: &[Tensor], attacker_texts: &[Vec<u32>], own_seen: &[Tensor], k1: usize, defence: Defence, step: &mut dyn FnMut(&str)) -> Result<Vec<AuditResult>> {
    let own = attacker_texts.iter().zip(own_seen).map(|(t, h)| learned::Text::new(h, t.clone())).collect::<Result<Vec<_>>>()?;
    let audited = samples.iter().zip(seen).map(|(s, h)| learned::Text::new(h, s.ids.clone())).collect::<Result<Vec<_>>>()?;
    let content: Vec<Vec<bool>> = samples.iter().map(|s| s.content.clone()).collect();
    let result = |inverter: &dyn learned::Inverter, train_tokens: usize| -> Result<AuditResult> {
        let (top1, top10, n) = learned::recovery(inverter, &audited, &content)?;
        let f = |x: usize| if n == 0 { 0.0 } else { x as f64 / n as f64 };
        Ok(AuditResult { attack: "learned", direction: "up", input_layers: k1, inverter: inverter.name(), defence: defence.name(), top1: f(top1), top10: f(top10), tokens: n, train_tokens: Some(train_tokens) })
    };
    let mut out = vec![result(&learned::Linear::nearest_embedding(model.embedder.weight())?, 0)?];
    let vocab = model.embedder.weight().dim(0)?;
    for share in BUDGETS {
        let texts = learned::budget(&own, share);
        let (x, tokens) = learned::pairs(texts)?;
        step(&format!("linear probe on {} pairs", tokens.len()));
        out.push(result(&learned::Linear::probe(&x, &tokens, vocab)?, tokens.len())?);
        step(&format!("MLP on {} pairs", tokens.len()));
        out.push(result(&learned::MlpWindow::train(texts, 0)?, tokens.len())?);
    }
    Ok(out)
}
