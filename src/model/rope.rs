//! Rotary position embeddings: the cos/sin tables, built once per model and shared by every
//! layer stack, and their application in the half-split (Hugging Face) or interleaved (GGUF)
//! style.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::ops::Ops;

/// Rotary tables are built for at most this many positions (or the model's own limit if lower).
pub const MAX_CONTEXT: usize = 32_768;

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
        self.rotate(x, &self.cos.narrow(0, pos, seq)?, &self.sin.narrow(0, pos, seq)?, ops)
    }

    /// Rotates `x`, `(batch, heads, seq, head_dim)`, row `i` at position `positions[i]` (the rows
    /// of a draft tree); each row rotates exactly as [`Rope::apply`] rotates it at that position.
    pub fn apply_at(&self, x: &Tensor, positions: &[usize], ops: Ops) -> Result<Tensor> {
        if positions.len() != x.dim(2)? || positions.iter().any(|&p| p >= self.max_positions()) {
            return Err(crate::error::Error::invalid(format!("{} rotary positions for {} rows (tables of {})", positions.len(), x.dim(2)?, self.max_positions())));
        }
        let idx = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), positions.len(), self.cos.device())?;
        self.rotate(x, &self.cos.index_select(&idx, 0)?, &self.sin.index_select(&idx, 0)?, ops)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, ops: Ops) -> Result<Tensor> {
        let (cos, sin) = (cos.clone(), sin.clone());
        use candle_nn::rotary_emb as re;
        Ok(match (self.style, ops) {
            (RopeStyle::Half, Ops::Fused) => re::rope(x, &cos, &sin)?,
            (RopeStyle::Half, Ops::Differentiable) => re::rope_slow(x, &cos, &sin)?,
            (RopeStyle::Interleaved, Ops::Fused) => re::rope_i(x, &cos, &sin)?,
            (RopeStyle::Interleaved, Ops::Differentiable) => re::rope_i_slow(x, &cos, &sin)?,
        })
    }
}
