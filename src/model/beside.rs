//! The training-only "beside" pass: a drafted stream run from position 0 beside the true one,
//! each drafted position attending to the true stream's earlier keys and values and to its own,
//! which is what a draft sees at run time behind a verified cache. Adapter training and
//! evaluation use it; inference never does.

use candle_core::{Tensor, D};
use candle_nn::RmsNorm;

use crate::error::{Error, Result};
use crate::model::layer::{causal_mask, Attention, AttentionMask, DecoderLayer};
use crate::model::ops::{rms_norm, softmax, Ops};
use crate::model::rope::Rope;
use crate::model::stack::LayerStack;

impl Attention {

    /// Attention of a drafted stream `(batch, seq, hidden)` from position 0 beside the true one,
    /// given the true stream's rotated keys and values `(batch, kv_heads, seq, head_dim)`: query t
    /// sees the true keys and values at positions before t and its own at t, which is what a
    /// draft sees at run time, when every earlier position is verified → `(batch, seq, hidden)`.
    fn attend_beside(&self, drafted: &Tensor, kt: &Tensor, vt: &Tensor, rope: &Rope, ops: Ops) -> Result<Tensor> {
        let (b, seq, _) = drafted.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let (qd, kd, vd) = self.qkv(drafted, 0, rope, ops, &AttentionMask::None)?;
        let qd = qd.reshape((b, nkv, n_rep * seq, hd))?;
        // Earlier true positions, then the drafted position itself (its key and value repeated
        // for the query heads that share them).
        let earlier = (qd.matmul(&kt.t()?)? * scale)?.broadcast_add(&causal_mask(seq, 0, n_rep, false, drafted.dtype(), drafted.device())?)?;
        let repeat = |t: &Tensor| Tensor::cat(&vec![t; n_rep], 2);
        let own = ((&qd * repeat(&kd)?)?.sum_keepdim(D::Minus1)? * scale)?;
        let att = softmax(&Tensor::cat(&[&earlier, &own], D::Minus1)?, ops)?;
        let yd = (att.narrow(D::Minus1, 0, seq)?.matmul(&vt.contiguous()?)? + att.narrow(D::Minus1, seq, 1)?.broadcast_mul(&repeat(&vd)?)?)?;
        self.merge_heads(&yd.reshape((b, nh, seq, hd))?, ops, false)
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] of a drafted stream `(batch, seq, hidden)` from position 0 beside
    /// the true one (see [`Attention::attend_beside`]) → the drafted output and, for
    /// [`Truth::States`] when `need_truth`, the true stream's output (the next layer's true input).
    fn forward_beside(&self, drafted: &Tensor, truth: LayerTruth, rope: &Rope, ops: Ops, need_truth: bool) -> Result<(Tensor, Option<Tensor>)> {
        let norm = |n: &RmsNorm, x: &Tensor, ops: Ops| rms_norm(n, x, self.eps, ops);
        let mlp = |x: Tensor, ops: Ops| -> Result<Tensor> { Ok((&x + self.mlp.forward(&norm(&self.post_attention_layernorm, &x, ops)?, ops, false)?)?) };
        let (kt, vt, truth_out) = match truth {
            LayerTruth::KeysValues(kt, vt) => (kt.clone(), vt.clone(), None),
            LayerTruth::States(truth) => {
                // A true stream that needs no gradient (constant input, frozen layer) runs the fused kernels.
                let constant = !truth.track_op() && !self.self_attn.qkv_proj.weight().track_op();
                let truth_ops = if constant { Ops::Fused } else { ops };
                let (qt, kt, vt) = self.self_attn.qkv(&norm(&self.input_layernorm, truth, truth_ops)?, 0, rope, truth_ops, &AttentionMask::None)?;
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
