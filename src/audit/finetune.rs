//! A private fine-tune of the input submodel (`--defences finetune=S`): device weights the cloud
//! cannot know that still give the model's answers.
//!
//! Secret weights alone (`weights=S`) cost accuracy: the public middle was trained on the public
//! input layers' states. Here the device starts from such secret weights (noise of `S` × each
//! weight row's RMS, from its own seed) and trains its input layers' projections to give the
//! model's next-token distribution again, through the public middle, output layers and head,
//! on text of its own: the loss is the KL divergence of the fine-tuned path's next-token
//! distribution from the public model's (computed alongside, never trained). Only the device knows the
//! result; a fine-tune that wins the answers back must make states the public middle reads as
//! the public ones, which is what the audit then measures against the attacks.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{LayerStack, Model, Ops};

/// How a private fine-tune trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FineTune {
    /// AdamW steps.
    pub steps: usize,
    /// Texts per step.
    pub batch: usize,
    /// Tokens of each text (longer ones are cut, shorter ones skipped).
    pub seq: usize,
    pub lr: f64,
}

impl Default for FineTune {
    fn default() -> Self {
        Self { steps: 60, batch: 4, seq: 64, lr: 2e-4 }
    }
}

/// What a fine-tune did: the loss (KL divergence from the public model's distribution, nats
/// per position) over its first and last fifth of the steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FineTuneReport {
    pub loss_first: f64,
    pub loss_last: f64,
}

/// Starts from `input.perturbed(sigma, seed)` and trains its projections for `cfg.steps` steps
/// to give `model`'s next-token distribution through the public layers after it (`model`'s
/// layers `[K1, L)`, K1 = `input`'s layer count) and head, on `texts` (drawn by `seed`). Returns
/// the fine-tuned input layers (f32, for inference) and the loss report.
pub fn private_finetune(model: &Model, input: &LayerStack, texts: &[Vec<u32>], sigma: f32, seed: u64, cfg: FineTune, mut tick: impl FnMut(usize, f64)) -> Result<(LayerStack, FineTuneReport)> {
    let usable: Vec<&[u32]> = texts.iter().filter(|t| t.len() >= cfg.seq).map(|t| &t[..cfg.seq]).collect();
    if usable.is_empty() || cfg.batch == 0 || cfg.seq < 2 {
        return Err(Error::invalid(format!("a private fine-tune needs texts of at least {} tokens (and a batch of at least one)", cfg.seq.max(2))));
    }
    let range = input.range();
    let rest = model.layers.slice(range.end..model.config.num_hidden_layers)?.with_ops(Ops::Differentiable);
    let head = model.head.clone().with_ops(Ops::Differentiable);
    // The secret starting point, its projections as trainable variables.
    let mut vars = Vec::new();
    let trainable = input.perturbed(sigma, seed)?.map_projections(|p| {
        let var = Var::from_tensor(&p.weight().to_dtype(DType::F32)?.copy()?)?;
        let proj = candle_nn::Linear::new(var.as_tensor().clone(), p.bias().cloned()).into();
        vars.push(var);
        Ok(proj)
    })?;
    let trainable = trainable.with_ops(Ops::Differentiable);
    let mut opt = candle_nn::AdamW::new(vars.clone(), candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xF1E7_07E5);
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let picked: Vec<&[u32]> = (0..cfg.batch).map(|_| usable[rng.random_range(0..usable.len())]).collect();
        let ids = Tensor::new(picked.concat(), &candle_core::Device::Cpu)?.reshape((cfg.batch, cfg.seq))?;
        let x = model.embedder.forward(&ids)?;
        // The public model's distribution at every position (no gradient).
        let teacher = picked.iter().map(|t| model.forward_all(t, &mut model.new_cache())).collect::<Result<Vec<_>>>()?;
        let teacher_logp = candle_nn::ops::log_softmax(&Tensor::stack(&teacher, 0)?, D::Minus1)?.detach();
        let h = trainable.forward(&x, 0, &mut trainable.new_cache())?;
        let h = rest.forward(&h, 0, &mut rest.new_cache())?;
        let logp = candle_nn::ops::log_softmax(&head.forward(&h)?, D::Minus1)?;
        // KL(model ‖ fine-tuned), nats per position.
        let loss = (teacher_logp.exp()? * (&teacher_logp - logp)?)?.sum(D::Minus1)?.mean_all()?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::invalid(format!("the private fine-tune diverged at step {step} (loss {value})")));
        }
        opt.backward_step(&loss)?;
        losses.push(value);
        tick(step, value);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = (cfg.steps / 5).max(1).min(losses.len());
    let report = FineTuneReport { loss_first: mean(&losses[..k]), loss_last: mean(&losses[losses.len() - k..]) };
    // For inference: the trained weights, owned, through the f32 kernels.
    let mut it = vars.iter();
    let tuned = trainable.map_projections(|p| {
        let w = it.next().ok_or_else(|| Error::invalid("internal: a projection without its variable"))?;
        Ok(candle_nn::Linear::new(w.as_tensor().detach().copy()?, p.bias().cloned()).into())
    })?;
    Ok((tuned.with_ops(Ops::Fused), report))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::io::source::{LoadedModel, ModelSpec};
    use crate::testing::{tiny_model, TinySpec};

    /// The share of positions of `texts` whose greedy next token through `input` and the
    /// public rest of `model` is the model's.
    fn agreement(model: &Model, input: &LayerStack, texts: &[Vec<u32>]) -> f64 {
        let rest = model.layers.slice(input.range().end..model.config.num_hidden_layers).unwrap();
        let (mut same, mut all) = (0, 0);
        for t in texts {
            let want = model.forward_all(t, &mut model.new_cache()).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            let h = input.forward(&model.embedder.embed_ids(t).unwrap(), 0, &mut input.new_cache()).unwrap();
            let h = rest.forward(&h, 0, &mut rest.new_cache()).unwrap();
            let got = model.head.forward(&h).unwrap().squeeze(0).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            same += want.iter().zip(&got).filter(|(a, b)| a == b).count();
            all += want.len();
        }
        same as f64 / all as f64
    }

    /// On a tiny model: secret weights cost agreement with the model; the fine-tune lowers its
    /// loss and wins agreement back on texts it never trained on; the result is seeded.
    #[test]
    fn a_private_finetune_wins_back_what_secret_weights_cost() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), TinySpec::default()).unwrap();
        let model = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap().model(DType::F32, &Device::Cpu).unwrap();
        let input = model.layers.slice(0..1).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut text = |n: usize| (0..n).map(|_| rng.random_range(3..256u32)).collect::<Vec<u32>>();
        let train: Vec<Vec<u32>> = (0..24).map(|_| text(24)).collect();
        let held_out: Vec<Vec<u32>> = (0..6).map(|_| text(24)).collect();
        let cfg = FineTune { steps: 40, batch: 4, seq: 16, lr: 3e-3 };
        let sigma = 1.0;
        let before = agreement(&model, &input.perturbed(sigma, 11).unwrap(), &held_out);
        let (tuned, report) = private_finetune(&model, &input, &train, sigma, 11, cfg, |_, _| {}).unwrap();
        let after = agreement(&model, &tuned, &held_out);
        eprintln!("agreement {before:.3} → {after:.3}, loss {:.3} → {:.3}", report.loss_first, report.loss_last);
        assert!(before < 0.9, "secret weights should cost agreement here: {before}");
        assert!(report.loss_last < report.loss_first, "{report:?}");
        assert!(after > before, "the fine-tune wins agreement back: {before} → {after}");
        let (again, _) = private_finetune(&model, &input, &train, sigma, 11, cfg, |_, _| {}).unwrap();
        let x = model.embedder.embed_ids(&held_out[0]).unwrap();
        let run = |s: &LayerStack| s.forward(&x, 0, &mut s.new_cache()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(run(&tuned), run(&again), "seeded");
        // Texts too short for the sequence length are refused.
        assert!(private_finetune(&model, &input, &[vec![1, 2, 3]], sigma, 11, cfg, |_, _| {}).is_err());
    }
}
