//! Checkpoints: the weights, the optimiser's moments and the run's state, written atomically,
//! and checked against the run's settings on `--resume`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use crate::train::config::TrainConfig;
use crate::train::report::{CurvePoint, Evaluation, StepTotals};
use crate::train::optim::AdamW;
use crate::train::weights::AdapterWeights;

/// Checkpoint contents besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    pub(crate) config: TrainConfig,
    pub(crate) split_id: String,
    pub(crate) step: usize,
    pub(crate) elapsed_s: f64,
    pub(crate) curve: Vec<CurvePoint>,
    pub(crate) evals: Vec<Evaluation>,
    /// Missing in checkpoints of older versions (their steps then go untimed).
    #[serde(default)]
    pub(crate) timed: StepTotals,
}

pub(crate) fn checkpoint_paths(out: &Path) -> (PathBuf, PathBuf) {
    let base = out.with_extension("ckpt");
    (base.with_extension("ckpt.safetensors"), base.with_extension("ckpt.json"))
}

pub(crate) fn save_checkpoint(out: &Path, w: &AdapterWeights, opt: &AdamW, state: &CheckpointState) -> Result<()> {
    let (tensors_path, state_path) = checkpoint_paths(out);
    let mut t = HashMap::new();
    for (i, (name, var)) in w.vars.iter().enumerate() {
        t.insert(format!("var.{name}"), var.as_tensor().clone());
        t.insert(format!("m.{name}"), opt.m[i].clone());
        t.insert(format!("v.{name}"), opt.v[i].clone());
    }
    let tmp = tensors_path.with_extension("partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, &tensors_path).map_err(|e| Error::io(&tensors_path, e))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::bad_file(&state_path, e))?;
    std::fs::write(&state_path, text).map_err(|e| Error::io(&state_path, e))
}

pub(crate) fn load_checkpoint(out: &Path, w: &AdapterWeights, opt: &mut AdamW, config: &TrainConfig, split_id: &str) -> Result<CheckpointState> {
    let (tensors_path, state_path) = checkpoint_paths(out);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, format!("invalid checkpoint: {e}")))?;
    if state.split_id != split_id {
        return Err(Error::bad_file(&state_path, format!("checkpoint is for split {}, not {split_id}", state.split_id)));
    }
    let mut want = config.clone();
    want.time_budget_s = state.config.time_budget_s;
    want.steps = state.config.steps;
    want.storage = state.config.storage;
    if want != state.config {
        return Err(Error::bad_file(&state_path, "checkpoint was made with other settings (only --steps, --time-budget and --storage may change on --resume)"));
    }
    let t = candle_core::safetensors::load(&tensors_path, &Device::Cpu)?;
    let get = |k: String| t.get(&k).cloned().ok_or_else(|| Error::bad_file(&tensors_path, format!("checkpoint lacks {k}")));
    for (i, (name, var)) in w.vars.iter().enumerate() {
        var.set(&get(format!("var.{name}"))?)?;
        opt.m[i] = get(format!("m.{name}"))?;
        opt.v[i] = get(format!("v.{name}"))?;
    }
    opt.step = state.step;
    Ok(state)
}

