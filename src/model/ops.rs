//! Which implementation of the non-matmul ops runs ([`Ops`]), and the building blocks every
//! layer shares: RMS norm, softmax, projections (the small-m kernel, the frozen-weight matmul of
//! training, or candle's gemm) and fused linear layers.

use std::sync::Arc;

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, RmsNorm, VarBuilder};

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::q4::PackedQ4;
use crate::model::q8::Q8Matrix;

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
/// `exact` blocks (draft trees) take the small-m kernel up to
/// [`crate::model::kernels::EXACT_ROWS`] rows, so that each row computes as it would alone.
pub(crate) fn project(proj: &Proj, x: &Tensor, ops: Ops, exact: bool) -> Result<Tensor> {
    let lin = &proj.lin;
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let cpu_f32 = crate::model::kernels::is_cpu_f32(x) && crate::model::kernels::is_cpu_f32(lin.weight());
    let limit = if exact { crate::model::kernels::EXACT_ROWS } else { crate::model::kernels::SMALL_M };
    let fused = ops == Ops::Fused && cpu_f32;
    let small = fused && rows <= limit;
    let y = if let (true, Some(q8)) = (small, &proj.q8) {
        q8.matmul(x)?
    } else if let (true, Some(q4)) = (fused, &proj.q4) {
        // Any block, with the small-m kernel's bits: bound by arithmetic whatever the rows, it
        // beats gemm over the f32 weights on prompt chunks of tens of rows (16 rows on one core:
        // 1.5x) and matches it on long ones.
        q4.matmul(x)?
    } else if small {
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
/// A linear layer's weights: f32 (candle-nn's [`Linear`]); optionally a row-scaled 8-bit copy
/// ([`Q8Matrix`]) that then serves every block of up to [`crate::model::kernels::SMALL_M`] rows
/// (draft compute only; the LLM path never has one); and, where the f32 values are exactly
/// 4-bit affine blocks, those blocks ([`PackedQ4`]), which serve every block with the f32
/// small-m kernel's bits.
#[derive(Debug, Clone)]
pub struct Proj {
    pub(crate) lin: Linear,
    pub(crate) q8: Option<Arc<Q8Matrix>>,
    pub(crate) q4: Option<Arc<PackedQ4>>,
}

impl From<Linear> for Proj {
    fn from(lin: Linear) -> Self {
        Self { lin, q8: None, q4: None }
    }
}

impl Proj {
    /// The f32 weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        self.lin.weight()
    }

    /// The bias, if any, `(out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.lin.bias()
    }

    /// A copy whose short blocks compute from 8-bit weights.
    pub fn with_q8(&self) -> Result<Self> {
        Ok(Self { q8: Some(Arc::new(Q8Matrix::quantize(self.lin.weight())?)), ..self.clone() })
    }

    /// The layer, with its weight's 4-bit blocks when it is exactly such blocks
    /// ([`PackedQ4::detect`]).
    pub fn packed(lin: Linear) -> Result<Self> {
        let q4 = PackedQ4::detect(lin.weight())?.map(Arc::new);
        Ok(Self { lin, q8: None, q4 })
    }

    /// Whether short blocks compute from 4-bit blocks.
    pub fn is_packed(&self) -> bool {
        self.q4.is_some()
    }
}

pub(crate) fn fused_linear(vb: &VarBuilder, names: &[&str], in_dim: usize, out_dims: &[usize], bias: bool) -> Result<Proj> {
    let mut weights = Vec::with_capacity(names.len());
    let mut biases = Vec::with_capacity(names.len());
    for (name, &out) in names.iter().zip(out_dims) {
        weights.push(vb.pp(name).get((out, in_dim), "weight")?);
        if bias {
            biases.push(vb.pp(name).get(out, "bias")?);
        }
    }
    let bias = if bias { Some(Tensor::cat(&biases, 0)?) } else { None };
    Proj::packed(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

/// Softmax over the last axis: candle-nn's fused kernel, or its differentiable composition.
pub(crate) fn softmax(x: &Tensor, ops: Ops) -> Result<Tensor> {
    Ok(match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x)?,
        Ops::Differentiable => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}
