//! One pre-norm decoder layer (grouped-query attention with rotary positions, SwiGLU MLP) and
//! the attention masks a forward pass decides once for all of a stack's layers.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use crate::error::Result;
use crate::model::cache::KvCache;
use crate::model::config::ModelConfig;
use crate::model::ops::{fused_linear, load_rms_norm, project, rms_norm, softmax, Ops, Proj};
use crate::model::rope::Rope;

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
    /// The rows form (part of) a draft tree: each sees the cached prefix, its ancestors and
    /// itself, at its own rotary position; every row computes exactly as it would alone.
    Tree(std::sync::Arc<crate::model::tree::TreeMask>),
}

impl AttentionMask {
    /// The mask for `seq` queries after `pos` cached positions, for queries like `x`.
    pub fn causal(x: &Tensor, seq: usize, pos: usize, n_rep: usize, ops: Ops) -> Result<Self> {
        if ops == Ops::Fused && crate::model::kernels::is_cpu_f32(x) && n_rep * seq <= crate::model::kernels::MAX_FUSED_ROWS {
            Ok(Self::FusedCausal)
        } else if seq == 1 {
            Ok(Self::None)
        } else {
            Ok(Self::Additive(causal_mask(seq, pos, n_rep, true, x.dtype(), x.device())?))
        }
    }

    /// Whether the block's rows must compute exactly as alone (the row-invariant kernels).
    fn exact(&self) -> bool {
        matches!(self, Self::Tree(_))
    }

    /// The rotary positions of a tree's rows (`None`: consecutive from the block's start).
    fn positions(&self) -> Option<&[usize]> {
        match self {
            Self::Tree(t) => Some(&t.positions),
            _ => None,
        }
    }
}

/// Causal mask for `seq` new positions after `pos` cached ones, repeated for the `n_rep` query
/// heads that share a key/value head: `(n_rep * seq, pos + seq)`, 0 where visible, -inf elsewhere.
/// With `sees_itself` false a query sees only the positions before its own.
pub(crate) fn causal_mask(seq: usize, pos: usize, n_rep: usize, sees_itself: bool, dtype: DType, device: &Device) -> Result<Tensor> {
    let kv = pos + seq;
    let last_seen = |i: usize| if sees_itself { pos + i + 1 } else { pos + i };
    let row: Vec<f32> = (0..seq)
        .flat_map(|i| (0..kv).map(move |j| if j >= last_seen(i) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(row.repeat(n_rep), (n_rep * seq, kv), device)?.to_dtype(dtype)?)
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    /// `q_proj`, `k_proj`, `v_proj` fused: hidden → `q_dim + 2 * kv_dim`.
    pub(crate) qkv_proj: Proj,
    pub(crate) o_proj: Proj,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, bias) = (cfg.hidden_size, cfg.attention_bias);
        let outs = [cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim()];
        Ok(Self {
            qkv_proj: fused_linear(&vb, &["q_proj", "k_proj", "v_proj"], h, &outs, bias)?,
            o_proj: Proj::packed(candle_nn::linear_b(cfg.q_dim(), h, false, vb.pp("o_proj"))?)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// Queries `(batch, heads, seq, head_dim)` and keys, values `(batch, kv_heads, seq,
    /// head_dim)` of `x`, `(batch, seq, hidden)` at positions `pos..pos + seq` (or the tree's
    /// positions of `mask`), rotated.
    pub(crate) fn qkv(&self, x: &Tensor, pos: usize, rope: &Rope, ops: Ops, mask: &AttentionMask) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = project(&self.qkv_proj, x, ops, mask.exact())?; // (b, seq, (nh + 2 * nkv) * hd)
        self.split_heads(&qkv, pos, rope, ops, mask)
    }

    /// [`Attention::qkv`] from the projection already made, `(batch, seq, (nh + 2 * nkv) * hd)`.
    fn split_heads(&self, qkv: &Tensor, pos: usize, rope: &Rope, ops: Ops, mask: &AttentionMask) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, seq, _) = qkv.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            let t = qkv.narrow(D::Minus1, start * hd, n * hd)?;
            Ok(t.reshape((b, seq, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let rotate = |x: &Tensor| match mask.positions() {
            Some(p) => rope.apply_at(x, p, ops),
            None => rope.apply(x, pos, ops),
        };
        let q = rotate(&heads(0, nh)?)?;
        let k = rotate(&heads(nh, nkv)?)?;
        Ok((q, k, heads(nh + nkv, nkv)?))
    }

    /// Heads `(batch, heads, seq, head_dim)` → `(batch, seq, hidden)` through `o_proj`.
    pub(crate) fn merge_heads(&self, y: &Tensor, ops: Ops, exact: bool) -> Result<Tensor> {
        let (b, nh, seq, hd) = y.dims4()?;
        project(&self.o_proj, &y.transpose(1, 2)?.reshape((b, seq, nh * hd))?, ops, exact)
    }

    /// `x`: `(batch, seq, hidden)` at positions `pos..pos + seq` → `(batch, seq, hidden)`.
    pub(crate) fn forward(&self, x: &Tensor, pos: usize, rope: &Rope, cache: &mut KvCache, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, pos, rope, ops, mask)?;
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
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        self.merge_heads(&self.attend_heads(q, k, v, ops, mask)?, ops, mask.exact())
    }

    /// [`Attention::attend`] before `o_proj`: `(batch, heads, seq, head_dim)`.
    fn attend_heads(&self, q: &Tensor, k: &Tensor, v: &Tensor, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let (b, nh, seq, hd) = q.dims4()?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share a K/V head
        // are stacked along the sequence axis, (b, nh, seq, hd) -> (b, nkv, n_rep * seq, hd).
        let n_rep = nh / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, n_rep * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let y = match mask {
            AttentionMask::FusedCausal => crate::model::kernels::causal_attention(&q, k, v, seq, scale as f32)?,
            AttentionMask::Tree(t) if crate::model::kernels::is_cpu_f32(&q) => crate::model::kernels::tree_attention(&q, k, v, t.clone(), scale as f32)?,
            AttentionMask::Tree(t) => {
                let m = t.additive(n_rep, k.dim(2)?, q.dtype(), q.device())?;
                generic_attention(&q, k, v, scale, Some(&m), ops)?
            }
            AttentionMask::Additive(m) => generic_attention(&q, k, v, scale, Some(m), ops)?,
            AttentionMask::None => generic_attention(&q, k, v, scale, None, ops)?,
        };
        Ok(y.reshape((b, nh, seq, hd))?)
    }
}

/// `softmax(q kᵀ · scale + mask) v` with candle's ops (any device and dtype): queries `(b,
/// nkv, n_rep * seq, hd)`, keys and values `(b, nkv, kv_len, hd)`, mask `(n_rep * seq, kv_len)`.
fn generic_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>, ops: Ops) -> Result<Tensor> {
    let att = (q.matmul(&k.t()?)? * scale)?;
    let att = match mask {
        Some(m) => att.broadcast_add(m)?,
        None => att,
    };
    Ok(softmax(&att, ops)?.matmul(&v.contiguous()?)?) // (b, nkv, n_rep * seq, hd)
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    /// `gate_proj` and `up_proj` fused: hidden → `2 * intermediate`.
    pub(crate) gate_up_proj: Proj,
    pub(crate) down_proj: Proj,
    pub(crate) intermediate: usize,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: fused_linear(&vb, &["gate_proj", "up_proj"], h, &[i, i], false)?,
            down_proj: Proj::packed(candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?)?,
            intermediate: i,
        })
    }

    /// `down(silu(gate(x)) * up(x))`.
    pub(crate) fn forward(&self, x: &Tensor, ops: Ops, exact: bool) -> Result<Tensor> {
        let gate_up = project(&self.gate_up_proj, x, ops, exact)?;
        let h = if ops == Ops::Fused && crate::model::kernels::is_cpu_f32(&gate_up) {
            crate::model::kernels::swiglu(&gate_up)?
        } else {
            let gate = candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, self.intermediate)?)?;
            (gate * gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?)?
        };
        project(&self.down_proj, &h, ops, exact)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
    pub(crate) eps: f64,
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

    /// A copy whose projections compute blocks of up to [`crate::model::kernels::SMALL_M`]
    /// positions from row-scaled 8-bit weights (draft compute).
    pub fn with_q8(&self) -> Result<Self> {
        let mut l = self.clone();
        l.self_attn.qkv_proj = l.self_attn.qkv_proj.with_q8()?;
        l.self_attn.o_proj = l.self_attn.o_proj.with_q8()?;
        l.mlp.gate_up_proj = l.mlp.gate_up_proj.with_q8()?;
        l.mlp.down_proj = l.mlp.down_proj.with_q8()?;
        Ok(l)
    }

    /// Several sessions' blocks packed along the sequence axis, `x`: `(1, Σ rows, hidden)`, each
    /// block in `blocks` (its rows, position, cache for this layer and mask, in order) → same
    /// shape. Projections, norms and the MLP run once over every row with the row-invariant
    /// kernels; rotary positions, the cache append and attention run per block against its own
    /// cache. Every row computes bitwise as in [`DecoderLayer::forward`] of its block alone, for
    /// blocks that compute exactly alone (see [`crate::model::LayerStack::forward_packed`]).
    pub(crate) fn forward_packed(&self, x: &Tensor, blocks: &mut [(usize, usize, &mut KvCache, &AttentionMask)], rope: &Rope) -> Result<Tensor> {
        let ops = Ops::Fused;
        let h = rms_norm(&self.input_layernorm, x, self.eps, ops)?;
        let qkv = project(&self.self_attn.qkv_proj, &h, ops, true)?;
        // Each session's rotary, cache append and attention against its own cache, the sessions
        // in parallel (in turn, they kept the other cores idle: 16 one-row sessions ran at 4.6×
        // one session's throughput, 5.9× in parallel; benches/README); each computes exactly as
        // it would alone.
        let offsets: Vec<usize> = blocks.iter().scan(0, |o, b| Some(std::mem::replace(o, *o + b.0))).collect();
        let attend = |(rows, pos, cache, mask): &mut (usize, usize, &mut KvCache, &AttentionMask), offset: usize| -> Result<Tensor> {
            let (q, k, v) = self.self_attn.split_heads(&qkv.narrow(1, offset, *rows)?, *pos, rope, ops, mask)?;
            let (k, v) = cache.append(&k, &v)?;
            let y = self.self_attn.attend_heads(&q, &k, &v, ops, mask)?; // (1, nh, rows, hd)
            let (b, nh, seq, hd) = y.dims4()?;
            Ok(y.transpose(1, 2)?.reshape((b, seq, nh * hd))?)
        };
        let ys: Vec<Tensor> = if x.device().is_cpu() {
            use rayon::prelude::*;
            blocks.par_iter_mut().zip(offsets).map(|(b, o)| attend(b, o)).collect::<Result<_>>()?
        } else {
            // A GPU queues the sessions' kernels on one stream anyway.
            blocks.iter_mut().zip(offsets).map(|(b, o)| attend(b, o)).collect::<Result<_>>()?
        };
        let y = Tensor::cat(&ys, 1)?;
        let x = (x + project(&self.self_attn.o_proj, &y, ops, true)?)?;
        let h = rms_norm(&self.post_attention_layernorm, &x, self.eps, ops)?;
        Ok((&x + self.mlp.forward(&h, ops, true)?)?)
    }

    /// `x`: `(batch, seq, hidden)` at positions `pos..pos + seq` → same shape.
    pub fn forward(&self, x: &Tensor, pos: usize, rope: &Rope, cache: &mut KvCache, ops: Ops, mask: &AttentionMask) -> Result<Tensor> {
        let h = rms_norm(&self.input_layernorm, x, self.eps, ops)?;
        let x = (x + self.self_attn.forward(&h, pos, rope, cache, ops, mask)?)?;
        let h = rms_norm(&self.post_attention_layernorm, &x, self.eps, ops)?;
        Ok((&x + self.mlp.forward(&h, ops, mask.exact())?)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::tree::{TreeShape, ROOT};

    /// The tree mask added to the scores (the generic path) attends exactly where the f32
    /// kernel does: same outputs within f32 rounding, for every row of a branching tree after
    /// a cached prefix, with several query heads per K/V head.
    #[test]
    fn the_additive_tree_mask_attends_where_the_kernel_does() {
        let dev = Device::Cpu;
        let (nkv, n_rep, hd, prefix) = (2, 3, 16, 9);
        let shape = TreeShape::new(vec![ROOT, 0, 0, 1, 1, 2, 3]).unwrap();
        let rows = shape.len();
        let kv = prefix + rows;
        let q = Tensor::randn(0f32, 1.0, (1, nkv, n_rep * rows, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, kv, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, kv, hd), &dev).unwrap();
        let mask = shape.mask(prefix, 0..rows);
        let scale = 0.25f32;
        let want = crate::model::kernels::tree_attention(&q, &k, &v, mask.clone(), scale).unwrap();
        let additive = mask.additive(n_rep, kv, candle_core::DType::F32, &dev).unwrap();
        let got = generic_attention(&q, &k, &v, scale as f64, Some(&additive), Ops::Fused).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        // A mask past the cache is refused.
        assert!(mask.additive(n_rep, kv - 1, candle_core::DType::F32, &dev).is_err());
    }
}
