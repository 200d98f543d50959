//! Small fused CPU kernels where candle's generic ops lose to dispatch overhead or strided access.
//! Inference only (no backward): training uses [`crate::model::Ops::Differentiable`], which never
//! comes here.
//!
//! ## Causal attention for short query blocks (decode steps, draft blocks)
//!
//! For a handful of query rows, candle's batched matmul + softmax + matmul costs ~100 µs per
//! layer in thread-pool dispatch alone, far more than the arithmetic. [`causal_attention`]
//! computes `softmax(q kᵀ · scale + causal mask) v` row by row in one pass, reading K/V straight
//! from the (strided) cache views. Each row is computed the same way whatever the block size, so a
//! token's result does not depend on how many tokens were fed with it.
//!
//! ## SwiGLU on the fused gate/up projection
//!
//! The MLP's gate and up projections run as one matmul whose output is `[gate | up]` along the
//! last axis; [`swiglu`] reads both halves and writes `silu(gate) * up` contiguously in one pass
//! (candle's unary/binary ops on the two strided halves cost ~3× more).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows up to which [`causal_attention`] is used instead of matmuls.
pub const MAX_FUSED_ROWS: usize = 64;

/// `q`: `(b, g, rows, d)` contiguous, the `rows = rep * seq` query rows of the `rep` heads that
/// share K/V group `g` (rep-major); `k`, `v`: `(b, g, len, d)`, any strides with a contiguous last
/// dim. Query `i` of a block (row `r`, `i = r % seq`) sees keys `[0, pos + i]`, `pos = len - seq`.
#[derive(Debug, Clone, Copy)]
struct CausalAttention {
    seq: usize,
    scale: f32,
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "hat-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("hat-causal-attention: f32 only")
        };
        let (b, g, rows, d) = dims4(lq)?;
        let (_, _, len, _) = dims4(lk)?;
        if !lq.is_contiguous() || lk.stride()[3] != 1 || lv.stride()[3] != 1 || dims4(lv)? != dims4(lk)? {
            candle_core::bail!("hat-causal-attention: unexpected layouts")
        }
        let q = &q[lq.start_offset()..];
        let (ks, vs) = (lk.stride(), lv.stride());
        let (k, v) = (&k[lk.start_offset()..], &v[lv.start_offset()..]);
        let pos = len - self.seq;
        let mut out = vec![0f32; b * g * rows * d];
        let row_fn = |(idx, o): (usize, &mut [f32])| {
            let (bi, rest) = (idx / (g * rows), idx % (g * rows));
            let (gi, r) = (rest / rows, rest % rows);
            let visible = pos + r % self.seq + 1;
            let qr = &q[idx * d..(idx + 1) * d];
            let kb = bi * ks[0] + gi * ks[1];
            let vb = bi * vs[0] + gi * vs[1];
            let mut scores: Vec<f32> = (0..visible)
                .map(|j| {
                    let kr = &k[kb + j * ks[2]..kb + j * ks[2] + d];
                    qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * self.scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, s) in scores.iter().enumerate() {
                let w = s / sum;
                let vr = &v[vb + j * vs[2]..vb + j * vs[2] + d];
                o.iter_mut().zip(vr).for_each(|(o, x)| *o += w * x);
            }
        };
        let work = b * g * rows * len * d;
        if work > 1 << 16 {
            out.par_chunks_mut(d).enumerate().for_each(row_fn);
        } else {
            out.chunks_mut(d).enumerate().for_each(row_fn);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g, rows, d))))
    }
}

/// Causal attention for a block of `seq` queries after `len - seq` cached positions; shapes as
/// in the op above. Returns `(b, g, rows, d)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, seq: usize, scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &CausalAttention { seq, scale })
}

/// Whether a tensor is f32 on the CPU (where these kernels run).
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

#[derive(Debug, Clone, Copy)]
struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "hat-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { candle_core::bail!("hat-swiglu: f32 only") };
        if !l.is_contiguous() {
            candle_core::bail!("hat-swiglu: input must be contiguous")
        }
        let dims = l.dims();
        let two_i = dims[dims.len() - 1];
        if two_i % 2 != 0 {
            candle_core::bail!("hat-swiglu: last dim {two_i} is odd")
        }
        let i = two_i / 2;
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let mut out = vec![0f32; x.len() / 2];
        let row = |(o, r): (&mut [f32], &[f32])| {
            let (gate, up) = r.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        if out.len() > 1 << 15 {
            out.par_chunks_mut(i).zip(x.par_chunks(two_i)).for_each(row);
        } else {
            out.chunks_mut(i).zip(x.chunks(two_i)).for_each(row);
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = i;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `silu(x[..., :I]) * x[..., I:]` for `x` of shape `(..., 2I)` (contiguous, f32, CPU) → `(..., I)`.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.apply_op1_no_bwd(&SwiGlu)
}
