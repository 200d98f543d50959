//! The splittable Llama-family engine.
//!
//! A model is three kinds of pieces, each loaded on its own from a [`VarBuilder`] whose tree
//! mirrors the checkpoint's tensor names (`model.embed_tokens`, `model.layers.{i}`, `model.norm`,
//! `lm_head`):
//! - [`Embedder`]: token ids `(batch, seq)` → hidden states `(batch, seq, hidden)`;
//! - [`LayerStack`]: any range `[a, b)` of decoder layers, hidden → hidden, with its own
//!   [`StackCache`] that takes blocks of several positions and truncates back (rollback);
//! - [`Head`]: final norm + LM head, hidden `(batch, seq, hidden)` → logits `(batch, seq, vocab)`.
//!
//! [`Model`] chains them for the unsplit reference. Compute is f32 on CPU; weights may be stored
//! in f16/bf16 and are converted when loaded. [`Ops::Differentiable`] swaps candle-nn's fused
//! kernels (rms_norm, rope, softmax_last_dim: no backward) for compositions that have gradients.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use crate::cache::KvCache;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};

/// Rotary tables are built for at most this many positions (or the model's own limit if lower).
pub const MAX_CONTEXT: usize = 32_768;

/// Which implementation of the non-matmul ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    /// candle-nn's fused CPU/GPU kernels: fastest, inference only.
    #[default]
    Fused,
    /// Compositions of basic ops that support backprop (for adapter training).
    Differentiable,
}

/// Rotary position embedding tables, `(positions, head_dim / 2)` each.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let positions = cfg.max_position_embeddings.min(MAX_CONTEXT);
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..cfg.head_dim)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / cfg.head_dim as f32))
            .map(|f| match &cfg.rope_scaling {
                None => f,
                Some(s) => {
                    let orig = s.original_max_position_embeddings as f32;
                    let (low_wavelen, high_wavelen) = (orig / s.low_freq_factor, orig / s.high_freq_factor);
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (positions, half), device)?.to_dtype(dtype);
        Ok(Self { cos: table(cos)?, sin: table(sin)?, style: cfg.rope_style })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x`, `(batch, heads, seq, head_dim)`, whose first position is `pos`.
    pub fn apply(&self, x: &Tensor, pos: usize, ops: Ops) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        use candle_nn::rotary_emb as re;
        Ok(match (self.style, ops) {
            (RopeStyle::Half, Ops::Fused) => re::rope(x, &cos, &sin)?,
            (RopeStyle::Half, Ops::Differentiable) => re::rope_slow(x, &cos, &sin)?,
            (RopeStyle::Interleaved, Ops::Fused) => re::rope_i(x, &cos, &sin)?,
            (RopeStyle::Interleaved, Ops::Differentiable) => re::rope_i_slow(x, &cos, &sin)?,
        })
    }
}

fn rms_norm(norm: &RmsNorm, x: &Tensor, eps: f64, ops: Ops) -> Result<Tensor> {
    Ok(match ops {
        Ops::Fused => norm.forward(x)?,
        Ops::Differentiable => candle_nn::ops::rms_norm_slow(x, norm.weight(), eps as f32)?,
    })
}

/// A linear layer: the small-m kernel for short blocks on CPU (decode, drafts, verification), a
/// matmul whose backward skips the weight's gradient for frozen layers in training, candle-nn's
/// `Linear` (gemm) otherwise.
fn project(lin: &Linear, x: &Tensor, ops: Ops) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let cpu_f32 = crate::kernels::is_cpu_f32(x) && crate::kernels::is_cpu_f32(lin.weight());
    let y = if ops == Ops::Fused && rows <= crate::kernels::SMALL_M && cpu_f32 {
        crate::kernels::small_m_matmul(x, lin.weight())?
    } else if ops == Ops::Differentiable && !lin.weight().track_op() && cpu_f32 {
        // A frozen layer in training: gradients flow to the input only.
        crate::kernels::frozen_matmul(x, &lin.weight().t()?)?
    } else {
        return Ok(lin.forward(x)?);
    };
    Ok(match lin.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

fn load_rms_norm(vb: VarBuilder, cfg: &ModelConfig) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(cfg.hidden_size, "weight")?, cfg.rms_norm_eps))
}

/// How a block of queries is kept from seeing later positions; decided once per forward pass
/// for all layers of a stack.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// One query: it sees every cached position.
    None,
    /// The fused CPU kernel applies the causal mask itself.
    FusedCausal,
    /// Added to the scores: `(n_rep * seq, pos + seq)`, from [`causal_mask`].
    Additive(Tensor),
}

impl AttentionMask {
    /// The mask for `seq` queries after `pos` cached positions, for queries like `x`.
    pub fn causal(x: &Tensor, seq: usize, pos: usize, n_rep: usize, ops: Ops) -> Result<Self> {
        if ops == Ops::Fused && crate::kernels::is_cpu_f32(x) && n_rep * seq <= crate::kernels::MAX_FUSED_ROWS {
            Ok(Self::FusedCausal)
        } else if seq == 1 {
            Ok(Self::None)
        } else {
            Ok(Self::Additive(causal_mask(seq, pos, n_rep, true, x.dtype(), x.device())?))
        }
    }
}

/// Causal mask for `seq` new positions after `pos` cached ones, repeated for the `n_rep` query
/// heads that share a key/value head: `(n_rep * seq, pos + seq)`, 0 where visible, -inf elsewhere.
/// With `sees_itself` false a query sees only the positions before its own.
fn causal_mask(seq: usize, pos: usize, n_rep: usize, sees_itself: bool, dtype: DType, device: &Device) -> Result<Tensor> {
    let kv = pos + seq;
    let last_seen = |i: usize| if sees_itself { pos + i + 1 } else { pos + i };
    let row: Vec<f32> = (0..seq)
        .flat_map(|i| (0..kv).map(move |j| if j >= last_seen(i) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(row.repeat(n_rep), (n_rep * seq, kv), device)?.to_dtype(dtype)?)
}

/// Loads several linear layers that read the same input as one: their weights (and biases)
/// concatenated along the output axis, so one matmul serves them all (fewer, larger gemm calls).
fn fused_linear(vb: &VarBuilder, names: &[&str], in_dim: usize, out_dims: &[usize], bias: bool) -> Result<Linear> {
    let mut weights = Vec::with_capacity(names.len());
    let mut biases = Vec::with_capacity(names.len());
    for (name, &out) in names.iter().zip(out_dims) {
        weights.push(vb.pp(name).get((out, in_dim), "weight")?);
        if bias {
            biases.push(vb.pp(name).get(out, "bias")?);
        }
    }
    let bias = if bias { Some(Tensor::cat(&biases, 0)?) } else { None };
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj`, `v_proj` fused: hidden → `q_dim + 2 * kv_dim`.
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, bias) = (cfg.hidden_size, cfg.attention_bias);
        let outs = [cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim()];
        Ok(Self {
            qkv_proj: fused_linear(&vb, &["q_proj", "k_proj", "v_proj"], h, &outs, bias)?,
            o_proj: candle_nn::linear_b(cfg.q_dim(), h, false, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// Queries `(batch, heads, seq, head_dim)` and keys, values `(batch, kv_heads, seq,
    /// head_dim)` of `x`, `(batch, seq, hidden)` at positions `pos..pos + seq`, rotated.
    fn qkv(&self, x: &Tensor, pos: usize, rope: &Rope, ops: Ops) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, seq, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = project(&self.qkv_proj, x, ops)?; // (b, seq, (nh + 2 * nkv) * hd)
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            let t = qkv.narrow(D::Minus1, start * hd, n * hd)?;
            Ok(t.reshape((b, seq, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope.apply(&heads(0, nh)?, pos, ops)?;
        let k = rope.apply(&heads(nh, nkv)?, pos, ops)?;
        Ok((q, k, heads(nh + nkv, nkv)?))
    }

    /// Heads `(batch, heads, seq, head_dim)` → `(batch, seq, hidden)` through `o_proj`.
    fn merge_heads(&self, y: &Tensor, ops: Ops) -> Result<Tensor> {
        let (b, nh, seq, hd) = y.dims4()?;
        project(&self.o_proj, &y.transpose(1, 2)?.reshape((b, seq, nh * hd))?, ops)
    }

    /// `x`: `(batch, seq, hidden)` at positions `pos..pos + seq` → `(batch, seq, hidden)`.
    fn forward(&self, x: &Tensor, pos: usize, rope: &Rope, cache: &mut KvCache, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, pos, rope, ops)?;
        let (k, v) = match ops {
            Ops::Fused => cache.append(&k, &v)?, // (b, nkv, pos + seq, hd)
            // The cache writes in place (no gradient): attend to the new K/V themselves, after
            // the (constant) cached prefix, and keep the cache in step.
            Ops::Differentiable => {
                let prefix = cache.current()?;
                cache.append(&k, &v)?;
                match prefix {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                }
            }
        };
        self.attend(&q, &k, &v, ops, mask)
    }

    /// `softmax(q kᵀ / √d + mask) v` through `o_proj`: queries `(batch, heads, seq, head_dim)`,
    /// keys and values `(batch, kv_heads, kv_len, head_dim)` → `(batch, seq, hidden)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let (b, nh, seq, hd) = q.dims4()?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share a K/V head
        // are stacked along the sequence axis, (b, nh, seq, hd) -> (b, nkv, n_rep * seq, hd).
        let n_rep = nh / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, n_rep * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let y = match mask {
            AttentionMask::FusedCausal => crate::kernels::causal_attention(&q, k, v, seq, scale as f32)?,
            AttentionMask::None | AttentionMask::Additive(_) => {
                let att = (q.matmul(&k.t()?)? * scale)?;
                let att = match mask {
                    AttentionMask::Additive(m) => att.broadcast_add(m)?,
                    _ => att,
                };
                softmax(&att, ops)?.matmul(&v.contiguous()?)? // (b, nkv, n_rep * seq, hd)
            }
        };
        self.merge_heads(&y.reshape((b, nh, seq, hd))?, ops)
    }

    /// Attention of a drafted stream `(batch, seq, hidden)` from position 0 beside the true one,
    /// given the true stream's rotated keys and values `(batch, kv_heads, seq, head_dim)`: query t
    /// sees the true keys and values at positions before t and its own at t, which is what a
    /// draft sees at run time, when every earlier position is verified → `(batch, seq, hidden)`.
    fn attend_beside(&self, drafted: &Tensor, kt: &Tensor, vt: &Tensor, rope: &Rope, ops: Ops) -> Result<Tensor> {
        let (b, seq, _) = drafted.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let (qd, kd, vd) = self.qkv(drafted, 0, rope, ops)?;
        let qd = qd.reshape((b, nkv, n_rep * seq, hd))?;
        // Earlier true positions, then the drafted position itself (its key and value repeated
        // for the query heads that share them).
        let earlier = (qd.matmul(&kt.t()?)? * scale)?.broadcast_add(&causal_mask(seq, 0, n_rep, false, drafted.dtype(), drafted.device())?)?;
        let repeat = |t: &Tensor| Tensor::cat(&vec![t; n_rep], 2);
        let own = ((&qd * repeat(&kd)?)?.sum_keepdim(D::Minus1)? * scale)?;
        let att = softmax(&Tensor::cat(&[&earlier, &own], D::Minus1)?, ops)?;
        let yd = (att.narrow(D::Minus1, 0, seq)?.matmul(&vt.contiguous()?)? + att.narrow(D::Minus1, seq, 1)?.broadcast_mul(&repeat(&vd)?)?)?;
        self.merge_heads(&yd.reshape((b, nh, seq, hd))?, ops)
    }
}

/// Softmax over the last axis: candle-nn's fused kernel, or its differentiable composition.
fn softmax(x: &Tensor, ops: Ops) -> Result<Tensor> {
    Ok(match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x)?,
        Ops::Differentiable => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj` fused: hidden → `2 * intermediate`.
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: fused_linear(&vb, &["gate_proj", "up_proj"], h, &[i, i], false)?,
            down_proj: candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?,
            intermediate: i,
        })
    }

    /// `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let gate_up = project(&self.gate_up_proj, x, ops)?;
        let h = if ops == Ops::Fused && crate::kernels::is_cpu_f32(&gate_up) {
            crate::kernels::swiglu(&gate_up)?
        } else {
            let gate = candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, self.intermediate)?)?;
            (gate * gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?)?
        };
        project(&self.down_proj, &h, ops)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    /// Loads from `vb` rooted at the layer (`model.layers.{i}`).
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: load_rms_norm(vb.pp("input_layernorm"), cfg)?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: load_rms_norm(vb.pp("post_attention_layernorm"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// `x`: `(batch, seq, hidden)` at positions `pos..pos + seq` → same shape.
    pub fn forward(&self, x: &Tensor, pos: usize, rope: &Rope, cache: &mut KvCache, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let h = rms_norm(&self.input_layernorm, x, self.eps, ops)?;
        let x = (x + self.self_attn.forward(&h, pos, rope, cache, ops, mask)?)?;
        let h = rms_norm(&self.post_attention_layernorm, &x, self.eps, ops)?;
        Ok((&x + self.mlp.forward(&h, ops)?)?)
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] of a drafted stream `(batch, seq, hidden)` from position 0 beside
    /// the true one (see [`Attention::attend_beside`]) → the drafted output and, for
    /// [`Truth::States`] when `need_truth`, the true stream's output (the next layer's true input).
    fn forward_beside(&self, drafted: &Tensor, truth: LayerTruth, rope: &Rope, ops: Ops, need_truth: bool) -> Result<(Tensor, Option<Tensor>)> {
        let norm = |n: &RmsNorm, x: &Tensor, ops: Ops| rms_norm(n, x, self.eps, ops);
        let mlp = |x: Tensor, ops: Ops| -> Result<Tensor> { Ok((&x + self.mlp.forward(&norm(&self.post_attention_layernorm, &x, ops)?, ops)?)?) };
        let (kt, vt, truth_out) = match truth {
            LayerTruth::KeysValues(kt, vt) => (kt.clone(), vt.clone(), None),
            LayerTruth::States(truth) => {
                // A true stream that needs no gradient (constant input, frozen layer) runs the fused kernels.
                let constant = !truth.track_op() && !self.self_attn.qkv_proj.weight().track_op();
                let truth_ops = if constant { Ops::Fused } else { ops };
                let (qt, kt, vt) = self.self_attn.qkv(&norm(&self.input_layernorm, truth, truth_ops)?, 0, rope, truth_ops)?;
                let out = if need_truth {
                    let seq = truth.dim(1)?;
                    let n_rep = self.self_attn.num_heads / self.self_attn.num_kv_heads;
                    let mask = AttentionMask::causal(truth, seq, 0, n_rep, truth_ops)?;
                    Some(mlp((truth + self.self_attn.attend(&qt, &kt, &vt, truth_ops, &mask)?)?, truth_ops)?)
                } else {
                    None
                };
                (kt, vt, out)
            }
        };
        let ad = self.self_attn.attend_beside(&norm(&self.input_layernorm, drafted, ops)?, &kt, &vt, rope, ops)?;
        Ok((mlp((drafted + ad)?, ops)?, truth_out))
    }
}

/// The true stream beside which [`LayerStack::forward_beside`] runs a drafted one.
#[derive(Debug, Clone, Copy)]
pub enum Truth<'a> {
    /// The true states `(batch, seq, hidden)` entering the stack: each layer's keys and values
    /// are computed on the way (with gradients where the states or the layers have them).
    States(&'a Tensor),
    /// Each layer's rotated keys and values over the true states, `(batch, kv_heads, seq,
    /// head_dim)` each, computed once by [`LayerStack::keys_values`] (a frozen stack over
    /// constant states: the output submodel over the middle layers' outputs, in training).
    KeysValues(&'a [(Tensor, Tensor)]),
}

/// One layer's share of a [`Truth`].
enum LayerTruth<'a> {
    States(&'a Tensor),
    KeysValues(&'a Tensor, &'a Tensor),
}

/// The KV caches of a [`LayerStack`], one per layer; all hold the same number of positions.
#[derive(Debug, Clone, Default)]
pub struct StackCache {
    layers: Vec<KvCache>,
    /// Positions held (tracked here too, so that a stack of zero layers follows positions).
    len: usize,
}

impl StackCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls back to the first `len` positions (e.g. after rejected drafts).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|c| c.truncate(len));
        self.len = self.len.min(len);
    }

    /// Forgets every position and frees the memory.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(KvCache::clear);
        self.len = 0;
    }
}

/// Decoder layers `[start, end)` of a model, run on hidden states.
#[derive(Debug, Clone)]
pub struct LayerStack {
    range: Range<usize>,
    layers: Vec<DecoderLayer>,
    rope: Arc<Rope>,
    ops: Ops,
}

impl LayerStack {
    /// Loads layers `range` from `vb` rooted at the checkpoint (`model.layers.{i}` inside).
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig, range: Range<usize>, rope: Arc<Rope>) -> Result<Self> {
        if range.start > range.end || range.end > cfg.num_hidden_layers {
            return Err(Error::invalid(format!(
                "layer range [{}, {}) is not inside the model's {} layers",
                range.start, range.end, cfg.num_hidden_layers
            )));
        }
        let vb_layers = vb.pp("model.layers");
        let layers = range
            .clone()
            .map(|i| DecoderLayer::load(vb_layers.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { range, layers, rope, ops: Ops::Fused })
    }

    /// Builds a stack from layers made elsewhere (e.g. a trained adapter).
    pub fn from_layers(range: Range<usize>, layers: Vec<DecoderLayer>, rope: Arc<Rope>) -> Self {
        Self { range, layers, rope, ops: Ops::Fused }
    }

    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// The model layers this stack runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// An empty cache for this stack.
    pub fn new_cache(&self) -> StackCache {
        StackCache { layers: vec![KvCache::new(); self.layers.len()], len: 0 }
    }

    /// Runs `x`, `(batch, seq, hidden)`, the hidden states of positions `pos..pos + seq`, through
    /// the layers. `pos` must equal `cache.len()`: truncate the cache first to roll back.
    pub fn forward(&self, x: &Tensor, pos: usize, cache: &mut StackCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            return Err(Error::invalid("cache was made for another layer stack"));
        }
        if pos != cache.len() {
            return Err(Error::invalid(format!(
                "position {pos} does not follow the cache, which holds {} positions",
                cache.len()
            )));
        }
        let needed = pos + x.dim(1)?;
        if needed > self.rope.max_positions() {
            return Err(Error::ContextTooLong { needed, limit: self.rope.max_positions() });
        }
        let mut h = x.clone();
        if let Some(first) = self.layers.first() {
            let n_rep = first.self_attn.num_heads / first.self_attn.num_kv_heads;
            let run = |h: &mut Tensor, caches: &mut [KvCache]| -> Result<()> {
                let mask = AttentionMask::causal(h, h.dim(1)?, pos, n_rep, self.ops)?;
                for (layer, c) in self.layers.iter().zip(caches.iter_mut()) {
                    *h = layer.forward(h, pos, &self.rope, c, self.ops, &mask)?;
                }
                Ok(())
            };
            if let Err(e) = run(&mut h, &mut cache.layers) {
                // Keep every layer's cache at `pos`, as if this call never happened.
                cache.layers.iter_mut().for_each(|c| c.truncate(pos));
                return Err(e);
            }
        }
        cache.len = needed;
        Ok(h)
    }
}

impl LayerStack {
    /// Runs a drafted sequence `(batch, seq, hidden)` from position 0 as a draft runs at run
    /// time: position t attends to the true sequence's keys and values at earlier positions, where
    /// the cache holds verified states, and to its own drafted state. Returns the drafted
    /// stream's output `(batch, seq, hidden)`. For training and evaluation (no cache).
    pub fn forward_beside(&self, drafted: &Tensor, truth: Truth) -> Result<Tensor> {
        let (b, seq, _) = drafted.dims3()?;
        match truth {
            Truth::States(t) if t.dims() != drafted.dims() => {
                return Err(Error::invalid(format!("drafted states {:?} and true states {:?} differ in shape", drafted.dims(), t.dims())));
            }
            Truth::KeysValues(kv) if kv.len() != self.layers.len() || kv.iter().any(|(k, _)| k.dims().first() != Some(&b) || k.dims().get(2) != Some(&seq)) => {
                return Err(Error::invalid(format!("true keys and values do not fit {} layers over {b} × {seq} drafted positions", self.layers.len())));
            }
            _ => {}
        }
        if seq > self.rope.max_positions() {
            return Err(Error::ContextTooLong { needed: seq, limit: self.rope.max_positions() });
        }
        let mut d = drafted.clone();
        let mut t = match truth {
            Truth::States(t) => Some(t.clone()),
            Truth::KeysValues(_) => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_truth = match (truth, &t) {
                (Truth::KeysValues(kv), _) => LayerTruth::KeysValues(&kv[i].0, &kv[i].1),
                (Truth::States(_), Some(t)) => LayerTruth::States(t),
                (Truth::States(_), None) => return Err(Error::invalid("internal: the true stream ended early")),
            };
            let (nd, nt) = layer.forward_beside(&d, layer_truth, &self.rope, self.ops, i + 1 < self.layers.len())?;
            d = nd;
            if nt.is_some() {
                t = nt;
            }
        }
        Ok(d)
    }

    /// Each layer's rotated keys and values over `x`, `(batch, seq, hidden)` from position 0:
    /// `(batch, kv_heads, seq, head_dim)` each, what a cache filled with `x` holds (fused ops, no
    /// gradient). Feeds [`Truth::KeysValues`].
    pub fn keys_values(&self, x: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let mut cache = self.new_cache();
        self.clone().with_ops(Ops::Fused).forward(&x.detach(), 0, &mut cache)?;
        cache
            .layers
            .iter()
            .map(|c| match c.current()? {
                Some((k, v)) => Ok((k.contiguous()?, v.contiguous()?)),
                None => Err(Error::invalid("internal: an empty cache after a forward pass")),
            })
            .collect()
    }
}

/// Token embedding: ids `(batch, seq)` u32 → `(batch, seq, hidden)`.
#[derive(Debug, Clone)]
pub struct Embedder {
    embed: Embedding,
}

impl Embedder {
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let w = vb.pp("model.embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        Ok(Self { embed: Embedding::new(w, cfg.hidden_size) })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(ids)?)
    }

    /// Embeds one sequence of token ids, `(1, ids.len(), hidden)`.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.embed.embeddings().dim(0)?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let ids = Tensor::new(ids, self.embed.embeddings().device())?.unsqueeze(0)?;
        self.forward(&ids)
    }

    pub fn weight(&self) -> &Tensor {
        self.embed.embeddings()
    }
}

/// Final norm + LM head: `(batch, seq, hidden)` → logits `(batch, seq, vocab)`.
#[derive(Debug, Clone)]
pub struct Head {
    norm: RmsNorm,
    lm_head: Linear,
    eps: f64,
    ops: Ops,
}

impl Head {
    /// Loads `model.norm` and `lm_head` (or, with tied embeddings, `model.embed_tokens`).
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let norm = load_rms_norm(vb.pp("model.norm"), cfg)?;
        let shape = (cfg.vocab_size, cfg.hidden_size);
        let w = if cfg.tie_word_embeddings {
            vb.pp("model.embed_tokens").get(shape, "weight")?
        } else {
            vb.pp("lm_head").get(shape, "weight")?
        };
        Ok(Self { norm, lm_head: Linear::new(w, None), eps: cfg.rms_norm_eps, ops: Ops::Fused })
    }

    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// The final norm alone: `(batch, seq, hidden)` → same shape.
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(&self.norm, x, self.eps, self.ops)
    }

    /// The LM head's weight, `(vocab, hidden)`.
    pub fn weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// Logits at every position: `(batch, seq, hidden)` → `(batch, seq, vocab)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(&self.norm, x, self.eps, self.ops)?;
        project(&self.lm_head, &x, self.ops)
    }

    /// Logits of the last position only: `(batch, seq, hidden)` → `(batch, vocab)`.
    pub fn forward_last(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(1)?;
        let last = x.i((.., seq - 1..seq, ..))?;
        Ok(self.forward(&last)?.squeeze(1)?)
    }
}

/// The whole, unsplit model: the reference every split and speculative path must reproduce.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embedder: Embedder,
    pub layers: LayerStack,
    pub head: Head,
}

impl Model {
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let rope = Arc::new(Rope::new(cfg, vb.dtype(), vb.device())?);
        Ok(Self {
            config: cfg.clone(),
            embedder: Embedder::load(vb, cfg)?,
            layers: LayerStack::load(vb, cfg, 0..cfg.num_hidden_layers, rope)?,
            head: Head::load(vb, cfg)?,
        })
    }

    pub fn new_cache(&self) -> StackCache {
        self.layers.new_cache()
    }

    /// Feeds `ids` at positions `cache.len()..` and returns the logits of the last one, `(vocab,)`.
    pub fn forward_last(&self, ids: &[u32], cache: &mut StackCache) -> Result<Tensor> {
        let x = self.embedder.embed_ids(ids)?;
        let x = self.layers.forward(&x, cache.len(), cache)?;
        Ok(self.head.forward_last(&x)?.squeeze(0)?)
    }

    /// Feeds `ids` at positions `cache.len()..` and returns the logits at every one, `(seq, vocab)`.
    pub fn forward_all(&self, ids: &[u32], cache: &mut StackCache) -> Result<Tensor> {
        let x = self.embedder.embed_ids(ids)?;
        let x = self.layers.forward(&x, cache.len(), cache)?;
        Ok(self.head.forward(&x)?.squeeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Family;
    use crate::source::{LoadedModel, ModelSpec};
    use crate::testing::{tiny_model, TinySpec};

    fn load(spec: TinySpec) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), spec).unwrap();
        let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
        let model = loaded.model(DType::F32, &Device::Cpu).unwrap();
        (dir, model)
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// max |a - b| relative to max |b|.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6)
    }

    const IDS: [u32; 40] = [
        72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 1, 2, 3, 200, 201, 202, 50, 60, 70, 80, 90, 100, 110,
        120, 130, 140, 150, 160, 170, 180, 190, 5, 6, 7, 8, 9, 255,
    ];

    /// The logits of every position, fed all at once (matmul attention path: 40 * 2 rows > 64).
    fn reference(model: &Model) -> Tensor {
        model.forward_all(&IDS, &mut model.new_cache()).unwrap()
    }

    #[test]
    fn incremental_and_block_decoding_match_the_full_pass() {
        for spec in [
            TinySpec::default(),
            TinySpec { family: Family::Qwen2, kv_heads: 4, tie_embeddings: false, ..TinySpec::default() },
            TinySpec { kv_heads: 1, ..TinySpec::default() },
        ] {
            let (_d, model) = load(spec);
            let full = reference(&model);
            // One token at a time (fused attention, seq = 1).
            let mut cache = model.new_cache();
            for (i, &id) in IDS.iter().enumerate() {
                let l = model.forward_last(&[id], &mut cache).unwrap();
                let d = max_abs_diff(&l, &full.get(i).unwrap());
                assert!(d < 5e-5, "{spec:?}: position {i}: {d}");
            }
            // Blocks of 7 (fused attention with a causal mask inside the block).
            let mut cache = model.new_cache();
            let mut parts = Vec::new();
            for chunk in IDS.chunks(7) {
                parts.push(model.forward_all(chunk, &mut cache).unwrap());
            }
            let d = max_abs_diff(&Tensor::cat(&parts, 0).unwrap(), &full);
            assert!(d < 5e-5, "{spec:?}: blocks: {d}");
        }
    }

    #[test]
    fn rollback_forgets_rejected_positions() {
        let (_d, model) = load(TinySpec::default());
        let full = reference(&model);
        let mut cache = model.new_cache();
        model.forward_all(&IDS[..20], &mut cache).unwrap();
        // Feed 5 wrong "drafts", then roll back and feed the right tokens.
        model.forward_all(&[9, 9, 9, 9, 9], &mut cache).unwrap();
        assert_eq!(cache.len(), 25);
        cache.truncate(20);
        let l = model.forward_all(&IDS[20..], &mut cache).unwrap();
        let d = max_abs_diff(&l, &full.narrow(0, 20, 20).unwrap());
        assert!(d < 5e-5, "{d}");
    }

    #[test]
    fn positions_must_follow_the_cache() {
        let (_d, model) = load(TinySpec::default());
        let mut cache = model.new_cache();
        let x = model.embedder.embed_ids(&IDS[..3]).unwrap();
        let err = model.layers.forward(&x, 2, &mut cache).unwrap_err().to_string();
        assert!(err.contains("does not follow the cache"), "{err}");
        assert!(model.embedder.embed_ids(&[100_000]).is_err());
    }

    #[test]
    fn a_draft_beside_the_truth_sees_what_it_sees_behind_a_verified_cache() {
        let (_d, model) = load(TinySpec::default());
        let truth = model.embedder.embed_ids(&IDS[..12]).unwrap();
        let drafted = model.embedder.embed_ids(&IDS[20..32]).unwrap();
        let truth_kv = model.layers.keys_values(&truth).unwrap();
        for (ops, given) in [(Ops::Fused, false), (Ops::Differentiable, false), (Ops::Differentiable, true)] {
            let stack = model.layers.clone().with_ops(ops);
            // The true stream run alongside, or its keys and values computed beforehand.
            let given_truth = if given { Truth::KeysValues(&truth_kv) } else { Truth::States(&truth) };
            let beside = stack.forward_beside(&drafted, given_truth).unwrap();
            for t in 0..12 {
                // At run time: the cache holds the verified (true) positions before t, then the
                // draft at t runs as one query.
                let mut cache = model.layers.new_cache();
                if t > 0 {
                    model.layers.forward(&truth.narrow(1, 0, t).unwrap(), 0, &mut cache).unwrap();
                }
                let want = model.layers.forward(&drafted.narrow(1, t, 1).unwrap(), t, &mut cache).unwrap();
                let d = max_abs_diff(&beside.narrow(1, t, 1).unwrap(), &want);
                assert!(d < 5e-5, "{ops:?}, keys and values given: {given}, position {t}: {d}");
            }
        }
        // Drafted = truth: the plain causal pass.
        let same = model.layers.forward_beside(&truth, Truth::States(&truth)).unwrap();
        let plain = model.layers.forward(&truth, 0, &mut model.layers.new_cache()).unwrap();
        assert!(max_abs_diff(&same, &plain) < 5e-5);
        let short = drafted.narrow(1, 0, 5).unwrap();
        assert!(model.layers.forward_beside(&short, Truth::States(&truth)).is_err());
        assert!(model.layers.forward_beside(&short, Truth::KeysValues(&truth_kv)).is_err());
        assert!(model.layers.forward_beside(&drafted, Truth::KeysValues(&truth_kv[1..])).is_err());
    }

    #[test]
    fn differentiable_ops_match_fused_ops_and_have_gradients() {
        let (_d, model) = load(TinySpec::default());
        let full = reference(&model);
        let diff = Model {
            layers: model.layers.clone().with_ops(Ops::Differentiable),
            head: model.head.clone().with_ops(Ops::Differentiable),
            ..model.clone()
        };
        let mut cache = diff.new_cache();
        let l = diff.forward_all(&IDS, &mut cache).unwrap();
        let d = max_abs_diff(&l, &full);
        assert!(d < 5e-5, "{d}");

        // A gradient flows from the logits back to the input hidden states.
        let x = candle_core::Var::from_tensor(&model.embedder.embed_ids(&IDS[..8]).unwrap()).unwrap();
        let y = diff.layers.forward(x.as_tensor(), 0, &mut diff.new_cache()).unwrap();
        let loss = diff.head.forward(&y).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("gradient for the input");
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn layer_ranges_compose_to_the_whole_model() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), TinySpec::default()).unwrap();
        let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
        let model = loaded.model(DType::F32, &Device::Cpu).unwrap();
        let vb = loaded.weights.var_builder(DType::F32, &Device::Cpu).unwrap();
        let rope = Arc::new(Rope::new(&loaded.config, DType::F32, &Device::Cpu).unwrap());
        let stacks: Vec<LayerStack> =
            [0..1, 1..4, 4..6].into_iter().map(|r| LayerStack::load(&vb, &loaded.config, r, rope.clone()).unwrap()).collect();
        let mut caches: Vec<StackCache> = stacks.iter().map(LayerStack::new_cache).collect();
        let mut x = model.embedder.embed_ids(&IDS).unwrap();
        for (s, c) in stacks.iter().zip(caches.iter_mut()) {
            x = s.forward(&x, 0, c).unwrap();
        }
        let l = model.head.forward(&x).unwrap().squeeze(0).unwrap();
        assert!(max_abs_diff(&l, &reference(&model)) < 1e-5);
        assert!(LayerStack::load(&vb, &loaded.config, 4..7, rope).is_err());
    }
}
