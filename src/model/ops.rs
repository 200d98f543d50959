//! Which implementation of the non-matmul ops runs ([`Ops`]), and the building blocks every
//! layer shares: RMS norm, softmax, projections (the small-m kernel, the frozen-weight matmul of
//! training, or candle's gemm) and fused linear layers.

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, RmsNorm, VarBuilder};

use crate::error::Result;
use crate::model::config::ModelConfig;

/// Which implementation of the non-matmul ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    /// candle-nn's fused CPU/GPU kernels: fastest, inference only.
    #[default]
    Fused,
    /// Compositions of basic ops that support backprop (for adapter training).
    Differentiable,
}

pub(crate) fn rms_norm(norm: &RmsNorm, x: &Tensor, eps: f64, ops: Ops) -> Result<Tensor> {
    Ok(match ops {
        Ops::Fused => norm.forward(x)?,
        Ops::Differentiable => candle_nn::ops::rms_norm_slow(x, norm.weight(), eps as f32)?,
    })
}

/// A linear layer: the small-m kernel for short blocks on CPU (decode, drafts, verification), a
/// matmul whose backward skips the weight's gradient for frozen layers in training, candle-nn's
/// `Linear` (gemm) otherwise.
pub(crate) fn project(lin: &Linear, x: &Tensor, ops: Ops) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let cpu_f32 = crate::model::kernels::is_cpu_f32(x) && crate::model::kernels::is_cpu_f32(lin.weight());
    let y = if ops == Ops::Fused && rows <= crate::model::kernels::SMALL_M && cpu_f32 {
        crate::model::kernels::small_m_matmul(x, lin.weight())?
    } else if ops == Ops::Differentiable && !lin.weight().track_op() && cpu_f32 {
        // A frozen layer in training: gradients flow to the input only.
        crate::model::kernels::frozen_matmul(x, &lin.weight().t()?)?
    } else {
        return Ok(lin.forward(x)?);
    };
    Ok(match lin.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

pub(crate) fn load_rms_norm(vb: VarBuilder, cfg: &ModelConfig) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(cfg.hidden_size, "weight")?, cfg.rms_norm_eps))
}

/// Loads several linear layers that read the same input as one: their weights (and biases)
/// concatenated along the output axis, so one matmul serves them all (fewer, larger gemm calls).
pub(crate) fn fused_linear(vb: &VarBuilder, names: &[&str], in_dim: usize, out_dims: &[usize], bias: bool) -> Result<Linear> {
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

/// Softmax over the last axis: candle-nn's fused kernel, or its differentiable composition.
pub(crate) fn softmax(x: &Tensor, ops: Ops) -> Result<Tensor> {
    Ok(match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x)?,
        Ops::Differentiable => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}
