//! A stack of layers that computes in a rotated basis of the residual stream: with an orthogonal
//! `M` `(hidden, hidden)`, [`LayerStack::rotated`] maps states `x M` to `f(x) M` where the
//! original stack maps `x` to `f(x)`. Each RMS norm's scale is folded into the projections that
//! read it (`W diag(γ) M`, the norm's own scale set to 1: an RMS norm commutes with an orthogonal
//! map, not with a per-channel scale), and each projection that writes the residual stream is
//! rotated on its output (`Mᵀ W`).
//!
//! It is the classic obfuscation of split inference (the device rotates what it sends, the cloud
//! holds rotated middle weights); `hat audit` measures why it does not hide anything from a cloud
//! that also knows the public weights: the rotation is one least-squares solve away
//! ([`recover_rotation`]).
//!
//! The other stack the audit's defences build: [`LayerStack::perturbed`], the same layers with
//! secret noise on their weights (device weights the cloud cannot know).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, RmsNorm};
use rand::SeedableRng;

use super::layer::DecoderLayer;
use super::ops::Proj;
use super::stack::LayerStack;
use crate::error::{Error, Result};
use crate::util::linalg::standard_normal;

/// A random orthogonal matrix `(n, n)` (Gram–Schmidt on Gaussian rows, in f64), seeded.
pub fn random_orthogonal(n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(n);
    while rows.len() < n {
        let mut v: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        // Twice for numerical orthogonality.
        for _ in 0..2 {
            for r in &rows {
                let d: f64 = r.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(r).for_each(|(x, a)| *x -= d * a);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            rows.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    let flat: Vec<f32> = rows.into_iter().flatten().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (n, n), &Device::Cpu)?)
}

/// `W diag(γ) M` for a projection `W` `(out, hidden)` that reads a norm with scale `γ`.
fn read_rotated(p: &Proj, gamma: &Tensor, m: &Tensor) -> Result<Proj> {
    let w = p.weight().broadcast_mul(&gamma.unsqueeze(0)?)?.matmul(m)?;
    Ok(Linear::new(w, p.lin.bias().cloned()).into())
}

/// `Mᵀ W` (and `Mᵀ b`) for a projection `W` `(hidden, in)` that writes the residual stream.
fn write_rotated(p: &Proj, m: &Tensor) -> Result<Proj> {
    let mt = m.t()?;
    let w = mt.matmul(p.weight())?;
    let b = match p.lin.bias() {
        Some(b) => Some(b.unsqueeze(0)?.matmul(m)?.squeeze(0)?),
        None => None,
    };
    Ok(Linear::new(w, b).into())
}

impl LayerStack {
    /// The same layers in the basis rotated by the orthogonal `m` `(hidden, hidden)`: fed `x m`,
    /// they give `f(x) m` (up to float rounding). Weights are f32; no 8-bit copies.
    pub fn rotated(&self, m: &Tensor) -> Result<Self> {
        let hidden = m.dim(0)?;
        if m.dims() != [hidden, hidden] {
            return Err(Error::invalid(format!("a rotation must be square, got {:?}", m.dims())));
        }
        let m = m.to_dtype(DType::F32)?;
        let layers = self
            .layers
            .iter()
            .map(|l| -> Result<DecoderLayer> {
                let ones = |norm: &RmsNorm| -> Result<RmsNorm> { Ok(RmsNorm::new(norm.weight().ones_like()?, norm.eps())) };
                let mut r = l.clone();
                r.self_attn.qkv_proj = read_rotated(&l.self_attn.qkv_proj, l.input_layernorm.weight(), &m)?;
                r.self_attn.o_proj = write_rotated(&l.self_attn.o_proj, &m)?;
                r.mlp.gate_up_proj = read_rotated(&l.mlp.gate_up_proj, l.post_attention_layernorm.weight(), &m)?;
                r.mlp.down_proj = write_rotated(&l.mlp.down_proj, &m)?;
                r.input_layernorm = ones(&l.input_layernorm)?;
                r.post_attention_layernorm = ones(&l.post_attention_layernorm)?;
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, ..self.clone() })
    }

    /// The first layer's fused query/key/value weight `(q_dim + 2 kv_dim, hidden)` with its
    /// norm's scale folded in (`W diag(γ)`): what a rotated copy of it is compared against.
    pub fn first_read_weight(&self) -> Result<Tensor> {
        let l = self.layers.first().ok_or_else(|| Error::invalid("an empty stack has no first layer"))?;
        Ok(l.self_attn.qkv_proj.weight().broadcast_mul(&l.input_layernorm.weight().unsqueeze(0)?)?)
    }
}

/// What a cloud that holds the public weights and a rotated copy of its middle recovers of the
/// rotation: the least-squares `M̂ = argmin ‖A M − A'‖` over the first layer's folded read weights
/// (`A` public, `A'` as given to the cloud), `(hidden, hidden)`.
pub fn recover_rotation(public: &LayerStack, rotated: &LayerStack) -> Result<Tensor> {
    let a = public.first_read_weight()?.to_dtype(DType::F64)?;
    let a_rot = rotated.layers.first().ok_or_else(|| Error::invalid("an empty stack has no first layer"))?.self_attn.qkv_proj.weight().to_dtype(DType::F64)?;
    let gram: Vec<Vec<f64>> = a.t()?.matmul(&a)?.to_vec2()?;
    let n = gram.len();
    let scale = (0..n).map(|i| gram[i][i]).sum::<f64>() / n as f64;
    let inverse = Tensor::new(crate::util::linalg::invert_spd(gram, 1e-12 * scale)?, a.device())?.reshape((n, n))?;
    Ok(inverse.matmul(&a.t()?.matmul(&a_rot)?)?.to_dtype(DType::F32)?)
}

/// `W + σ · rms(row) · N(0, 1)` for every weight of a projection, seeded (biases unchanged).
fn perturbed(p: &Proj, sigma: f32, rng: &mut rand::rngs::StdRng) -> Result<Proj> {
    let w = p.weight().to_dtype(DType::F32)?;
    let (rows, cols) = w.dims2()?;
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    for row in v.chunks_mut(cols.max(1)) {
        let rms = (row.iter().map(|x| x * x).sum::<f32>() / cols.max(1) as f32).sqrt();
        row.iter_mut().for_each(|x| *x += sigma * rms * standard_normal(rng) as f32);
    }
    let w = Tensor::from_vec(v, (rows, cols), w.device())?;
    Ok(Linear::new(w, p.lin.bias().cloned()).into())
}

impl LayerStack {
    /// The same layers with secret weights: Gaussian noise of `sigma` × each weight row's RMS
    /// added to every projection (norms and biases as they were), drawn from `seed`. What a
    /// device whose weights the cloud cannot know computes without any training to win its
    /// accuracy back (`hat audit --defences weights=S`).
    pub fn perturbed(&self, sigma: f32, seed: u64) -> Result<Self> {
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(Error::invalid(format!("a weight perturbation must be finite and ≥ 0, got {sigma}")));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        self.map_projections(|p| perturbed(p, sigma, &mut rng))
    }

    /// The same layers with every projection replaced by `f` of it, layer by layer in the order
    /// fused QKV, output, fused gate/up, down (norms as they were).
    pub fn map_projections(&self, mut f: impl FnMut(&Proj) -> Result<Proj>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| -> Result<DecoderLayer> {
                let mut r = l.clone();
                r.self_attn.qkv_proj = f(&l.self_attn.qkv_proj)?;
                r.self_attn.o_proj = f(&l.self_attn.o_proj)?;
                r.mlp.gate_up_proj = f(&l.mlp.gate_up_proj)?;
                r.mlp.down_proj = f(&l.mlp.down_proj)?;
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { range: self.range.clone(), layers, rope: self.rope.clone(), ops: self.ops })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::source::{LoadedModel, ModelSpec};
    use crate::model::config::Family;
    use crate::testing::{tiny_model, TinySpec};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Fed rotated states, a rotated stack gives the rotated outputs (Llama, and Qwen2 with its
    /// projection biases); the rotation is recovered from its weights and the public ones.
    #[test]
    fn a_rotated_stack_computes_the_rotated_states_and_gives_its_rotation_away() {
        for spec in [TinySpec::default(), TinySpec { family: Family::Qwen2, kv_heads: 4, tie_embeddings: false, ..TinySpec::default() }] {
            let dir = tempfile::tempdir().unwrap();
            tiny_model(dir.path(), spec).unwrap();
            let model = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap().model(DType::F32, &Device::Cpu).unwrap();
            let hidden = model.config.hidden_size;
            let stack = model.layers.slice(1..3).unwrap();
            let m = random_orthogonal(hidden, 3).unwrap();
            let eye = Tensor::eye(hidden, DType::F32, &Device::Cpu).unwrap();
            assert!(max_abs(&(m.matmul(&m.t().unwrap()).unwrap() - &eye).unwrap()) < 1e-5, "orthogonal");
            let x = model.embedder.embed_ids(&[5, 9, 200, 31, 7]).unwrap(); // (1, 5, hidden)
            let plain = stack.forward(&x, 0, &mut stack.new_cache()).unwrap();
            let rotated = stack.rotated(&m).unwrap();
            let y = rotated.forward(&x.broadcast_matmul(&m).unwrap(), 0, &mut rotated.new_cache()).unwrap().broadcast_matmul(&m.t().unwrap()).unwrap();
            let err = max_abs(&(y - &plain).unwrap()) / max_abs(&plain);
            assert!(err < 1e-4, "the rotated stack differs by {err} (relative)");
            // The plain stack fed rotated states is something else entirely.
            let wrong = stack.forward(&x.broadcast_matmul(&m).unwrap(), 0, &mut stack.new_cache()).unwrap().broadcast_matmul(&m.t().unwrap()).unwrap();
            assert!(max_abs(&(wrong - &plain).unwrap()) / max_abs(&plain) > 1e-2);
            let m_hat = recover_rotation(&stack, &rotated).unwrap();
            let rec = max_abs(&(m_hat - &m).unwrap());
            assert!(rec < 1e-3, "rotation recovered to {rec}");
            assert!(max_abs(&(random_orthogonal(hidden, 4).unwrap() - &m).unwrap()) > 0.1, "seeds give different rotations");
        }
    }

    #[test]
    fn perturbed_weights_are_seeded_and_zero_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), TinySpec::default()).unwrap();
        let model = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap().model(DType::F32, &Device::Cpu).unwrap();
        let stack = model.layers.slice(0..2).unwrap();
        let x = model.embedder.embed_ids(&[5, 9, 200, 31, 7]).unwrap();
        let run = |s: &LayerStack| s.forward(&x, 0, &mut s.new_cache()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(run(&stack.perturbed(0.0, 7).unwrap()), run(&stack));
        let (a, b) = (run(&stack.perturbed(0.1, 7).unwrap()), run(&stack.perturbed(0.1, 7).unwrap()));
        assert_eq!(a, b, "the same seed, the same weights");
        assert_ne!(a, run(&stack), "noise changes the outputs");
        assert_ne!(a, run(&stack.perturbed(0.1, 8).unwrap()), "another seed, other weights");
        assert!(stack.perturbed(-1.0, 7).is_err() && stack.perturbed(f32::NAN, 7).is_err());
    }
}