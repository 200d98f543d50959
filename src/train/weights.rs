//! The adapter's trainable weights: initialised from the model's layers, run as an adapter,
//! saved through the adapter file format ([`crate::adapter::file`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::{Adapter, DraftContext, Storage, StoredAdapter};
use crate::error::{Error, Result};
use crate::model::Ops;

use crate::train::config::AdapterInit;

/// The adapter's trainable weights, by checkpoint name (`adapter.layers.{i}.…`, `adapter.fuse.weight`).
pub struct AdapterWeights {
    pub vars: Vec<(String, Var)>,
    pub(crate) num_layers: usize,
    pub(crate) draft_context: DraftContext,
}

/// Decoder-layer tensor names (relative to the layer).
pub(crate) const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
pub(crate) const LAYER_BIASES: [&str; 3] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"];

impl AdapterWeights {
    /// Initial weights copied from the model's layers (`weights`: a VarBuilder of the whole model).
    /// A conditioned adapter's fuse projection starts as `[0 | I]`: the adapter starts as the
    /// unconditioned one and learns how much of the previous middle output to mix in.
    pub fn init(weights: &candle_nn::VarBuilder, cfg: &crate::model::config::ModelConfig, middle: std::ops::Range<usize>, n: usize, init: &AdapterInit, conditioned: bool) -> Result<Self> {
        let mut vars = Vec::new();
        if conditioned {
            let eye = Tensor::eye(cfg.hidden_size, DType::F32, &Device::Cpu)?;
            vars.push((crate::adapter::FUSE.to_string(), Var::from_tensor(&Tensor::cat(&[&eye.zeros_like()?, &eye], 1)?)?));
        }
        let span = middle.end - middle.start;
        for j in 0..n {
            let src = match init {
                AdapterInit::Layer(l) => *l,
                // A warm start's names and shapes are these; [`AdapterWeights::warm_start`] then
                // sets the file's values.
                AdapterInit::Middle | AdapterInit::Identity | AdapterInit::Adapter(_) => middle.start + ((2 * j + 1) * span) / (2 * n),
            };
            if src >= cfg.num_hidden_layers {
                return Err(Error::invalid(format!("--init layer:{src}: the model has {} layers", cfg.num_hidden_layers)));
            }
            let vb = weights.pp("model.layers").pp(src);
            let names = LAYER_TENSORS.iter().chain(if cfg.attention_bias { LAYER_BIASES.iter() } else { [].iter() });
            for name in names {
                let mut t = vb.get_unchecked_dtype(name, DType::F32)?;
                if *init == AdapterInit::Identity && (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight")) {
                    t = t.zeros_like()?;
                }
                vars.push((format!("adapter.layers.{j}.{name}"), Var::from_tensor(&t)?));
            }
        }
        Ok(Self { vars, num_layers: n, draft_context: DraftContext::Drafted })
    }

    /// Sets every weight to a trained adapter's (`--init adapter:PATH`), which must have this
    /// run's layers, conditioning and draft context and exactly these tensors, shape for shape.
    pub fn warm_start(&self, stored: &StoredAdapter, path: &Path) -> Result<()> {
        let bad = |what: String| Error::invalid(format!("--init adapter:{}: {what}", path.display()));
        let conditioned = self.vars.iter().any(|(n, _)| n == crate::adapter::FUSE);
        if stored.layers != self.num_layers {
            return Err(bad(format!("it has {} layers, the run {} (--adapter-layers)", stored.layers, self.num_layers)));
        }
        if stored.conditioned != conditioned {
            let say = |c: bool| if c { "features" } else { "none" };
            return Err(bad(format!("its conditioning is {}, the run's {} (--conditioning)", say(stored.conditioned), say(conditioned))));
        }
        if stored.draft_context != self.draft_context {
            return Err(bad(format!("it drafts behind {} states, the run behind {} (--draft-context)", stored.draft_context.as_str(), self.draft_context.as_str())));
        }
        if let Some(extra) = stored.tensors.keys().find(|k| !self.vars.iter().any(|(n, _)| n == *k)) {
            return Err(bad(format!("it has a tensor {extra} that this run's adapter has not")));
        }
        for (name, var) in &self.vars {
            let t = stored.tensors.get(name).ok_or_else(|| bad(format!("it lacks {name}")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!("{name} is {:?}, the run's {:?}", t.dims(), var.dims())));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Sets what the output submodel attends to when the adapter drafts.
    pub fn with_draft_context(mut self, c: DraftContext) -> Self {
        self.draft_context = c;
        self
    }

    pub(crate) fn map(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    /// The adapter over the current weights (gradients flow to the vars).
    pub fn adapter(&self, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>, ops: Ops) -> Result<Adapter> {
        self.adapter_over(self.map(), manifest, rope, ops)
    }

    /// The adapter as a file in `storage` will hold it: the current weights, rounded the way
    /// [`AdapterWeights::save`] rounds them.
    pub fn stored_adapter(&self, storage: Storage, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>) -> Result<Adapter> {
        self.adapter_over(storage.round_trip(&self.map())?, manifest, rope, Ops::Fused)
    }

    pub(crate) fn adapter_over(&self, tensors: HashMap<String, Tensor>, manifest: &crate::split::Manifest, rope: Arc<crate::model::Rope>, ops: Ops) -> Result<Adapter> {
        let conditioned = tensors.contains_key(crate::adapter::FUSE);
        let mut adapter = Adapter::from_tensors(tensors, self.num_layers, conditioned, manifest, rope, &Device::Cpu)?;
        adapter.layers = adapter.layers.with_ops(ops);
        adapter.draft_context = self.draft_context;
        adapter.split_id = Some(manifest.split_id.clone());
        Ok(adapter)
    }

    /// Saves the adapter file, its weights in `storage`.
    pub fn save(&self, path: &Path, manifest: &crate::split::Manifest, storage: Storage, vocab: Option<&crate::adapter::DraftVocab>, training: &serde_json::Value) -> Result<()> {
        Adapter::save(path, &self.map(), manifest, self.num_layers, self.draft_context, storage, vocab, training)
    }
}

