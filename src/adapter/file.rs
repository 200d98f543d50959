//! The adapter file format, in one place: saving, loading, storage (f16 or int8), and which
//! file `--adapter` names.
//!
//! File format: safetensors with tensors `adapter.layers.{i}.*` (the names of a decoder layer),
//! `adapter.fuse.weight` `(hidden, 2·hidden)` for conditioned adapters, and metadata
//! `format = hat-adapter/1`, `split_id`, `base_model_hash`, `layers`, `conditioning`
//! (`middle-features` or `none`), `draft_context` (`drafted` or `verified`; `drafted` when
//! absent), `storage` ([`Storage`]; `f16` when absent), `hidden_size`, `architecture` and
//! `training` (JSON). An adapter is only valid for the split it was trained for.
//!
//! Optionally a draft vocabulary ([`DraftVocab`]): tensor `draft.vocab` (u32, token ids, most
//! frequent in the adapter's training data first) and metadata `draft_vocab_size` (how many of
//! them the draft head scores by default) and `draft_vocab_source`. Files without one still load
//! (the draft head then scores the whole vocabulary).


use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{Adapter, DraftContext};
use crate::error::{Error, Result};
use crate::model::Rope;
use crate::split::{DeviceBundle, Manifest};

pub const FORMAT: &str = "hat-adapter/1";
/// Name of the conditioning projection.
pub const FUSE: &str = "adapter.fuse.weight";

/// Where a shipped default adapter for a split lives: `adapters/<split id>.safetensors` in the
/// repository (or `$HAT_ADAPTERS`).
pub fn default_adapter_path(manifest: &Manifest) -> PathBuf {
    let dir = std::env::var_os("HAT_ADAPTERS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("adapters"));
    dir.join(format!("{}.safetensors", manifest.split_id))
}

/// The adapter `--adapter` names for a device bundle: `none` (the untrained default), `auto`
/// (the one shipped for this split, [`default_adapter_path`], if there is one, else none) or a
/// file. Returns it with a name to report (its path, or `none`).
pub fn load_choice(choice: &str, bundle: &DeviceBundle, device: &Device) -> Result<(Adapter, String)> {
    let path = match choice {
        "none" => None,
        "auto" => Some(default_adapter_path(&bundle.manifest)).filter(|p| p.exists()),
        path => Some(PathBuf::from(path)),
    };
    match path {
        None => Ok((Adapter::none(bundle.rope.clone()), "none".to_string())),
        Some(p) => Ok((Adapter::load(&p, &bundle.manifest, bundle.rope.clone(), device)?, p.display().to_string())),
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

/// Name of the draft vocabulary's tensor.
pub const DRAFT_VOCAB: &str = "draft.vocab";

/// The draft vocabulary stored with an adapter: token ids by frequency, and how many the draft
/// head scores by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftVocab {
    /// Token ids, most frequent first.
    pub ids: Vec<u32>,
    /// Rows scored by default (`<= ids.len()`).
    pub size: usize,
    /// Where the frequencies came from (free text).
    pub source: String,
}

impl DraftVocab {
    /// The first `n` ids (`None`: the default size), at most all of them.
    pub fn first(&self, n: Option<usize>) -> &[u32] {
        &self.ids[..n.unwrap_or(self.size).min(self.ids.len())]
    }
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

/// An adapter file as stored: its f32 weights (`adapter.layers.{i}.*`, [`FUSE`] when
/// conditioned) and what its metadata says, checked against a split.
pub struct StoredAdapter {
    pub tensors: HashMap<String, Tensor>,
    pub layers: usize,
    pub conditioned: bool,
    pub draft_context: DraftContext,
    pub draft_vocab: Option<DraftVocab>,
    pub split_id: String,
    pub metadata: HashMap<String, String>,
}

impl StoredAdapter {
    /// Reads an adapter file (its weights decoded to f32 on `device`) and checks it belongs to
    /// the split of `manifest`.
    pub fn read(path: &Path, manifest: &Manifest, device: &Device) -> Result<Self> {
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
        let layers: usize = meta.get("layers").and_then(|v| v.parse().ok()).ok_or_else(|| bad("adapter metadata lacks layers".into()))?;
        let storage = Storage::parse(meta.get("storage").map_or("f16", String::as_str)).map_err(|e| bad(e.to_string()))?;
        let mut stored = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(format!("cannot read adapter tensors: {e}")))?;
        let draft_vocab = match stored.remove(DRAFT_VOCAB) {
            None => None,
            Some(t) => {
                let ids = t.to_dtype(DType::U32).and_then(|t| t.flatten_all()?.to_vec1::<u32>()).map_err(|e| bad(format!("bad {DRAFT_VOCAB}: {e}")))?;
                let size = meta.get("draft_vocab_size").and_then(|v| v.parse().ok()).unwrap_or(ids.len()).min(ids.len());
                if ids.iter().any(|&t| t as usize >= manifest.config.vocab_size) || ids.is_empty() {
                    return Err(bad(format!("{DRAFT_VOCAB} is empty or names tokens outside the model's vocabulary")));
                }
                Some(DraftVocab { ids, size, source: meta.get("draft_vocab_source").cloned().unwrap_or_default() })
            }
        };
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
        Ok(Self { tensors, layers, conditioned, draft_context, draft_vocab, split_id, metadata: meta })
    }
}

impl Adapter {
    /// Loads an adapter file and checks it belongs to the bundle's split.
    pub fn load(path: &Path, manifest: &Manifest, rope: Arc<Rope>, device: &Device) -> Result<Self> {
        let s = StoredAdapter::read(path, manifest, device)?;
        let mut adapter = Self::from_tensors(s.tensors, s.layers, s.conditioned, manifest, rope, device).map_err(|e| Error::bad_file(path, e.to_string()))?;
        adapter.draft_context = s.draft_context;
        adapter.draft_vocab = s.draft_vocab;
        adapter.split_id = Some(s.split_id);
        adapter.metadata = s.metadata;
        Ok(adapter)
    }

    /// Writes an adapter file: the f32 weights `tensors` named `adapter.layers.{i}.*` (and
    /// [`FUSE`] for a conditioned adapter) in `storage`, plus the metadata.
    /// With `vocab`, the draft vocabulary is stored too.
    #[allow(clippy::too_many_arguments)]
    pub fn save(path: &Path, tensors: &HashMap<String, Tensor>, manifest: &Manifest, layers: usize, draft_context: DraftContext, storage: Storage, vocab: Option<&DraftVocab>, training: &serde_json::Value) -> Result<()> {
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
        let mut stored = storage.encode(tensors)?;
        if let Some(v) = vocab {
            meta.insert("draft_vocab_size".to_string(), v.size.to_string());
            meta.insert("draft_vocab_source".to_string(), v.source.clone());
            stored.insert(DRAFT_VOCAB.to_string(), Tensor::new(v.ids.as_slice(), &Device::Cpu)?);
        }
        write_atomically(path, &stored, meta)
    }

    /// Rewrites the adapter file at `path` to `out` with `vocab` as its draft vocabulary (any
    /// old one replaced); weights and other metadata are copied as stored.
    pub fn set_draft_vocab(path: &Path, out: &Path, vocab: &DraftVocab) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::bad_file(path, format!("not safetensors: {e}")))?;
        let mut meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(Error::bad_file(path, format!("not a hat adapter (metadata format is not {FORMAT})")));
        }
        let mut stored = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| Error::bad_file(path, e.to_string()))?;
        meta.insert("draft_vocab_size".to_string(), vocab.size.to_string());
        meta.insert("draft_vocab_source".to_string(), vocab.source.clone());
        stored.insert(DRAFT_VOCAB.to_string(), Tensor::new(vocab.ids.as_slice(), &Device::Cpu)?);
        write_atomically(out, &stored, meta)
    }
}

/// Writes a safetensors file through a `.partial` file renamed into place.
fn write_atomically(path: &Path, stored: &HashMap<String, Tensor>, meta: HashMap<String, String>) -> Result<()> {
        let tmp = path.with_extension("partial");
        safetensors::serialize_to_file(stored.iter(), Some(meta), &tmp)
            .map_err(|e| Error::bad_file(&tmp, format!("cannot write adapter: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
