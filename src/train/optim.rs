//! AdamW with saveable moments (exact resume) and global gradient-norm clipping.


use candle_core::{Tensor, Var};

use crate::error::Result;


/// AdamW whose moments can be saved and restored (exact resume).
pub(crate) struct AdamW {
    pub(crate) vars: Vec<(String, Var)>,
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    pub(crate) step: usize,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub(crate) fn new(vars: Vec<(String, Var)>) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        let vv = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, m, v: vv, step: 0 })
    }

    /// One update with the given gradients (already clipped).
    pub(crate) fn update(&mut self, grads: &candle_core::backprop::GradStore, lr: f64, wd: f64) -> Result<()> {
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
pub(crate) fn clip_factor(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
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
pub(crate) fn scale_grads(grads: &mut candle_core::backprop::GradStore, vars: &[(String, Var)], f: f64) -> Result<()> {
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

