//! The draft adapter: a few decoder layers at the model's hidden size that stand in for the
//! cloud's middle layers on the device (input submodel → adapter → output submodel = the SLM).
//!
//! Two kinds:
//! - **unconditioned**: the layers run on the input submodel's hidden states `h_in[t]` alone and
//!   must stand in for the whole middle (layer skipping);
//! - **feature-conditioned** (EAGLE-style): the layers' input at position t is
//!   `fuse · [rms(m[t-1]) ; h_in[t]]`, where `m[t-1]` is the middle layers' output at the previous
//!   position. The device holds `m` for every verified position anyway (it runs the output
//!   submodel on it), so conditioning costs no extra traffic and reveals nothing new; for drafted
//!   positions the adapter's own prediction stands in. The adapter's output at t predicts `m[t]`.
//!
//! What the SLM's output submodel attends to at earlier positions ([`DraftContext`]) is part of
//! an adapter too: it is trained for one of the two.
//!
//! File format: safetensors with tensors `adapter.layers.{i}.*` (the names of a decoder layer),
//! `adapter.fuse.weight` `(hidden, 2·hidden)` for conditioned adapters, and metadata
//! `format = hat-adapter/1`, `split_id`, `base_model_hash`, `layers`, `conditioning`
//! (`middle-features` or `none`), `draft_context` (`drafted` or `verified`; `drafted` when
//! absent), `storage` ([`Storage`]; `f16` when absent), `hidden_size`, `architecture` and
//! `training` (JSON). An adapter is only valid for the split it was trained for.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{DecoderLayer, LayerStack, Rope, StackCache, Truth};
use crate::split::Manifest;

pub const FORMAT: &str = "hat-adapter/1";
/// Name of the conditioning projection.
pub const FUSE: &str = "adapter.fuse.weight";

/// Where a shipped default adapter for a split lives: `adapters/<split id>.safetensors` in the
/// repository (or `$HAT_ADAPTERS`).
pub fn default_adapter_path(manifest: &Manifest) -> std::path::PathBuf {
    let dir = std::env::var_os("HAT_ADAPTERS").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from("adapters"));
    dir.join(format!("{}.safetensors", manifest.split_id))
}

/// What the SLM's output submodel attends to at the positions before the one it drafts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftContext {
    /// Its own states, computed over the adapter's predicted middle outputs: the SLM is a model
    /// of its own, with an output-submodel cache of its own.
    #[default]
    Drafted,
    /// The LLM's output-submodel states over the cloud's middle outputs (exact) for every
    /// verified position, and the drafts of the current round: the device computes those states
    /// anyway to verify, so the SLM only adds the drafted positions.
    Verified,
}

impl DraftContext {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "drafted" => Ok(Self::Drafted),
            "verified" => Ok(Self::Verified),
            _ => Err(Error::invalid(format!("unknown draft context '{s}' (this hat knows drafted and verified)"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drafted => "drafted",
            Self::Verified => "verified",
        }
    }
}

/// How an adapter file stores its weights (they always run in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Every tensor in f16: 2 bytes per weight.
    #[default]
    F16,
    /// Each matrix `name` `(rows, cols)` as `name.q8` (u8: `round(w / s) + 128`, symmetric, so
    /// 1..=255) and `name.q8_scale` (f32 `(rows,)`: `s = max |w| / 127` of the row); vectors
    /// (norm weights, biases) in f16. About 1 byte per weight; each weight within `s / 2` of the
    /// trained value.
    Int8,
}

/// Suffixes of an [`Storage::Int8`] matrix's two tensors.
const Q8: &str = ".q8";
const Q8_SCALE: &str = ".q8_scale";

impl Storage {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            _ => Err(Error::invalid(format!("unknown adapter storage '{s}' (this hat knows f16 and int8)"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    /// The tensors a file of this storage holds for the f32 weights `tensors`.
    pub fn encode(self, tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, t) in tensors {
            if self == Self::Int8 && t.rank() == 2 {
                let t = t.to_dtype(DType::F32)?;
                let scale = (t.abs()?.max_keepdim(1)? / 127.0)?;
                // All-zero rows: any scale decodes them exactly.
                let scale = scale.maximum(f32::MIN_POSITIVE)?;
                let q = (t.broadcast_div(&scale)?.round()?.clamp(-127f32, 127f32)? + 128.0)?.to_dtype(DType::U8)?;
                out.insert(format!("{name}{Q8}"), q);
                out.insert(format!("{name}{Q8_SCALE}"), scale.squeeze(1)?);
            } else {
                out.insert(name.clone(), t.to_dtype(DType::F16)?);
            }
        }
        Ok(out)
    }

    /// The f32 weights held by a file's `tensors` ([`Storage::encode`]'s inverse, up to the
    /// rounding it did).
    pub fn decode(self, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut scales = HashMap::new();
        let mut quantised = Vec::new();
        for (name, t) in tensors {
            if let Some(base) = name.strip_suffix(Q8_SCALE) {
                scales.insert(base.to_string(), t);
            } else if let Some(base) = name.strip_suffix(Q8) {
                quantised.push((base.to_string(), t));
            } else {
                out.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        if self != Self::Int8 && !(quantised.is_empty() && scales.is_empty()) {
            return Err(Error::invalid(format!("int8 tensors in an adapter whose storage is {}", self.as_str())));
        }
        for (name, q) in quantised {
            let scale = scales.remove(&name).ok_or_else(|| Error::invalid(format!("{name}{Q8} without its {name}{Q8_SCALE}")))?;
            if q.dtype() != DType::U8 || q.rank() != 2 || scale.dims() != [q.dim(0)?] {
                return Err(Error::invalid(format!("{name}{Q8} is not u8 (rows, cols) with an f32 (rows,) scale")));
            }
            let w = (q.to_dtype(DType::F32)? - 128.0)?.broadcast_mul(&scale.to_dtype(DType::F32)?.unsqueeze(1)?)?;
            out.insert(name, w);
        }
        if let Some(name) = scales.keys().next() {
            return Err(Error::invalid(format!("{name}{Q8_SCALE} without its {name}{Q8}")));
        }
        Ok(out)
    }

    /// f32 weights as a file of this storage gives them back: `decode(encode(tensors))`.
    pub fn round_trip(self, tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        self.decode(self.encode(tensors)?)
    }
}

/// A loaded adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Conditioned adapters: `(hidden, 2·hidden)`, maps `[rms(m[t-1]) ; h_in[t]]` to the layers'
    /// input (`rms`: scaled to unit root mean square per position, without weights; position 0,
    /// an attention sink, has ~40× the norm of the others).
    pub fuse: Option<Tensor>,
    pub layers: LayerStack,
    pub draft_context: DraftContext,
    /// The split it belongs to; `None` for the untrained default.
    pub split_id: Option<String>,
    pub metadata: HashMap<String, String>,
}

impl Adapter {
    /// The untrained default: no layers, the SLM runs the output submodel straight on the input
    /// submodel's hidden states (it "skips the middle"). Lossless, only fewer drafts accepted.
    pub fn none(rope: Arc<Rope>) -> Self {
        Self {
            fuse: None,
            layers: LayerStack::from_layers(0..0, Vec::new(), rope),
            draft_context: DraftContext::Drafted,
            split_id: None,
            metadata: HashMap::new(),
        }
    }

    /// Loads an adapter file and checks it belongs to the bundle's split.
    pub fn load(path: &Path, manifest: &Manifest, rope: Arc<Rope>, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |r: String| Error::bad_file(path, r);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not an adapter file (not safetensors: {e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a hat adapter (metadata format is not {FORMAT})")));
        }
        let split_id = meta.get("split_id").cloned().ok_or_else(|| bad("adapter has no split_id".into()))?;
        if split_id != manifest.split_id {
            return Err(bad(format!(
                "adapter was trained for split {split_id}, but the bundle is split {} ({}); train one for this split with `hat train-adapter`",
                manifest.split_id, manifest.source.name
            )));
        }
        let n: usize = meta.get("layers").and_then(|v| v.parse().ok()).ok_or_else(|| bad("adapter metadata lacks layers".into()))?;
        let storage = Storage::parse(meta.get("storage").map_or("f16", String::as_str)).map_err(|e| bad(e.to_string()))?;
        let stored = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(format!("cannot read adapter tensors: {e}")))?;
        let tensors = storage.decode(stored).map_err(|e| bad(format!("cannot read adapter tensors: {e}")))?;
        let draft_context = match meta.get("draft_context") {
            None => DraftContext::Drafted,
            Some(c) => DraftContext::parse(c).map_err(|e| bad(e.to_string()))?,
        };
        let conditioned = match meta.get("conditioning").map(String::as_str) {
            None | Some("none") => false,
            Some("middle-features") => true,
            Some(other) => return Err(bad(format!("unknown adapter conditioning '{other}' (this hat knows none and middle-features)"))),
        };
        let mut adapter = Self::from_tensors(tensors, n, conditioned, manifest, rope, device).map_err(|e| bad(e.to_string()))?;
        adapter.draft_context = draft_context;
        adapter.split_id = Some(split_id);
        adapter.metadata = meta;
        Ok(adapter)
    }

    /// An adapter of `n` layers over f32 `tensors` named as in the file (`adapter.layers.{i}.*`,
    /// and [`FUSE`] when `conditioned`), in the [`DraftContext::Drafted`] context and without a
    /// split id or metadata.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, n: usize, conditioned: bool, manifest: &Manifest, rope: Arc<Rope>, device: &Device) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let hidden = manifest.config.hidden_size;
        let fuse = if conditioned {
            Some(vb.get((hidden, 2 * hidden), FUSE).map_err(|e| Error::invalid(format!("conditioned adapter without a fitting {FUSE}: {e}")))?)
        } else {
            None
        };
        let vb = vb.pp("adapter.layers");
        let layers = (0..n)
            .map(|i| DecoderLayer::load(vb.pp(i), &manifest.config))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::invalid(format!("adapter tensors do not fit the model: {e}")))?;
        Ok(Self { fuse, layers: LayerStack::from_layers(0..n, layers, rope), draft_context: DraftContext::Drafted, split_id: None, metadata: HashMap::new() })
    }

    /// Whether the adapter reads the previous position's middle output (EAGLE-style).
    pub fn is_conditioned(&self) -> bool {
        self.fuse.is_some()
    }

    /// Runs the adapter on `h_in`, `(batch, n, hidden)`, the input submodel's hidden states of
    /// positions `pos..pos + n`. Conditioned adapters also take `prev`, `(batch, n, hidden)`: the
    /// middle output at positions `pos - 1..pos + n - 1` (zeros before position 0). Returns the
    /// predicted middle output `(batch, n, hidden)`.
    pub fn forward(&self, h_in: &Tensor, prev: Option<&Tensor>, pos: usize, cache: &mut StackCache) -> Result<Tensor> {
        self.layers.forward(&self.layer_input(h_in, prev)?, pos, cache)
    }

    /// The layers' input: `h_in`, or for conditioned adapters `fuse · [rms(prev) ; h_in]`.
    fn layer_input(&self, h_in: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        Ok(match (&self.fuse, prev) {
            (None, _) => h_in.clone(),
            (Some(fuse), Some(prev)) => Tensor::cat(&[&rms_normalise(prev)?, h_in], 2)?.broadcast_matmul(&fuse.t()?)?,
            (Some(_), None) => return Err(Error::invalid("a conditioned adapter needs the previous positions' middle output")),
        })
    }

    /// Teacher-forced run from position 0 over a whole sequence: `h_in` and `middle` (the middle
    /// layers' output at the same positions, required when conditioned) are `(batch, len,
    /// hidden)`; each position is conditioned on the previous position's middle output.
    pub fn forward_teacher_forced(&self, h_in: &Tensor, middle: Option<&Tensor>) -> Result<Tensor> {
        let prev = match (self.is_conditioned(), middle) {
            (true, Some(m)) => Some(shift_right(m)?),
            _ => None,
        };
        self.forward(h_in, prev.as_ref(), 0, &mut self.layers.new_cache())
    }

    /// Teacher-forced draft path from position 0 up to the output submodel: `h_in` and `middle`
    /// (the middle layers' true output at the same positions; required when conditioned or when
    /// the draft context is `verified`) are `(batch, len, hidden)`. Every position runs as the
    /// first draft of a round runs: behind verified positions. Returns the output submodel's
    /// hidden states (the head turns them into the drafts' logits) and the adapter's predicted
    /// middle outputs, both `(batch, len, hidden)`.
    pub fn draft_hidden(&self, output: &LayerStack, h_in: &Tensor, middle: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        self.draft_hidden_with(output, h_in, middle, None)
    }

    /// [`Adapter::draft_hidden`], with the output submodel's keys and values over `middle` given
    /// when they are already known (training computes them once per sequence).
    pub fn draft_hidden_with(&self, output: &LayerStack, h_in: &Tensor, middle: Option<&Tensor>, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<(Tensor, Tensor)> {
        let predicted = self.forward_teacher_forced(h_in, middle)?;
        Ok((self.output_hidden(output, &predicted, middle, output_kv)?, predicted))
    }

    /// The next draft of a round, teacher-forced like [`Adapter::draft_hidden`] (conditioned
    /// adapters): position t reads `drafted[t-1]`, the previous draft step's prediction of the
    /// middle output at t-1, where the first draft read the true one; like at run time it attends
    /// to the adapter states of earlier positions made from true middle outputs. (The output
    /// submodel's context is taken as verified at every earlier position, though at run time the
    /// previous position's state is a draft's.) Returns the output submodel's hidden states and
    /// the new predictions, `(batch, len, hidden)`.
    pub fn next_draft_hidden(&self, output: &LayerStack, h_in: &Tensor, middle: &Tensor, drafted: &Tensor, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<(Tensor, Tensor)> {
        if !self.is_conditioned() {
            return Err(Error::invalid("only a conditioned adapter reads its own drafts"));
        }
        let truth = self.layer_input(h_in, Some(&shift_right(middle)?))?;
        let from_drafts = self.layer_input(h_in, Some(&shift_right(drafted)?))?;
        let predicted = self.layers.forward_beside(&from_drafts, Truth::States(&truth))?;
        Ok((self.output_hidden(output, &predicted, Some(middle), output_kv)?, predicted))
    }

    /// The output submodel over predicted middle outputs `(batch, len, hidden)` from position 0,
    /// in this adapter's draft context (behind verified positions: the true `middle` outputs, or
    /// the output submodel's keys and values over them when given).
    fn output_hidden(&self, output: &LayerStack, predicted: &Tensor, middle: Option<&Tensor>, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<Tensor> {
        match (self.draft_context, output_kv, middle) {
            (DraftContext::Drafted, _, _) => output.forward(predicted, 0, &mut output.new_cache()),
            (DraftContext::Verified, Some(kv), _) => output.forward_beside(predicted, Truth::KeysValues(kv)),
            (DraftContext::Verified, None, Some(m)) => output.forward_beside(predicted, Truth::States(m)),
            (DraftContext::Verified, None, None) => Err(Error::invalid("internal: drafts behind verified positions need the true middle outputs")),
        }
    }

    /// Writes an adapter file: the f32 weights `tensors` named `adapter.layers.{i}.*` (and
    /// [`FUSE`] for a conditioned adapter) in `storage`, plus the metadata.
    pub fn save(path: &Path, tensors: &HashMap<String, Tensor>, manifest: &Manifest, layers: usize, draft_context: DraftContext, storage: Storage, training: &serde_json::Value) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("split_id".to_string(), manifest.split_id.clone());
        meta.insert("base_model_hash".to_string(), manifest.source.content_hash.clone());
        meta.insert("layers".to_string(), layers.to_string());
        let conditioning = if tensors.contains_key(FUSE) { "middle-features" } else { "none" };
        meta.insert("conditioning".to_string(), conditioning.to_string());
        meta.insert("draft_context".to_string(), draft_context.as_str().to_string());
        meta.insert("storage".to_string(), storage.as_str().to_string());
        meta.insert("hidden_size".to_string(), manifest.hidden_size.to_string());
        meta.insert("architecture".to_string(), serde_json::to_string(&manifest.config).unwrap_or_default());
        meta.insert("training".to_string(), training.to_string());
        let tmp = path.with_extension("partial");
        let stored = storage.encode(tensors)?;
        safetensors::serialize_to_file(stored.iter(), Some(meta), &tmp)
            .map_err(|e| Error::bad_file(&tmp, format!("cannot write adapter: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.num_layers()
    }
}

/// `(batch, len, hidden)` shifted one position later along `len`, zeros first: row t holds
/// row t-1.
fn shift_right(m: &Tensor) -> Result<Tensor> {
    let (b, n, h) = m.dims3()?;
    let zeros = Tensor::zeros((b, 1, h), m.dtype(), m.device())?;
    Ok(Tensor::cat(&[&zeros, &m.narrow(1, 0, n - 1)?], 1)?)
}

/// `x / sqrt(mean(x²) + ε)` over the last dimension, with differentiable ops.
fn rms_normalise(x: &Tensor) -> Result<Tensor> {
    let ms = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + 1e-6)?;
    Ok(x.broadcast_div(&ms.sqrt()?)?)
}
