//! The draft adapter: a few decoder layers at the model's hidden size that stand in for the
//! cloud's middle layers on the device (input submodel → adapter → output submodel = the SLM).
//!
//! File format: safetensors with tensors `adapter.layers.{i}.*` (the names of a decoder layer)
//! and metadata `format = hat-adapter/1`, `split_id`, `base_model_hash`, `layers`,
//! `hidden_size`, `architecture` and `training` (JSON). An adapter is only valid for the split it
//! was trained for.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{DecoderLayer, LayerStack, Rope};
use crate::split::Manifest;

pub const FORMAT: &str = "hat-adapter/1";

/// Where a shipped default adapter for a split lives: `adapters/<split id>.safetensors` in the
/// repository (or `$HAT_ADAPTERS`).
pub fn default_adapter_path(manifest: &Manifest) -> std::path::PathBuf {
    let dir = std::env::var_os("HAT_ADAPTERS").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from("adapters"));
    dir.join(format!("{}.safetensors", manifest.split_id))
}

/// A loaded adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub layers: LayerStack,
    /// The split it belongs to; `None` for the untrained default.
    pub split_id: Option<String>,
    pub metadata: HashMap<String, String>,
}

impl Adapter {
    /// The untrained default: no layers, the SLM runs the output submodel straight on the input
    /// submodel's hidden states (it "skips the middle"). Lossless, only fewer drafts accepted.
    pub fn none(rope: Arc<Rope>) -> Self {
        Self { layers: LayerStack::from_layers(0..0, Vec::new(), rope), split_id: None, metadata: HashMap::new() }
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
        let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes.clone(), DType::F32, device)
            .map_err(|e| bad(format!("cannot read adapter tensors: {e}")))?;
        let vb = vb.pp("adapter.layers");
        let layers = (0..n)
            .map(|i| DecoderLayer::load(vb.pp(i), &manifest.config))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| bad(format!("adapter tensors do not fit the model: {e}")))?;
        Ok(Self { layers: LayerStack::from_layers(0..n, layers, rope), split_id: Some(split_id), metadata: meta })
    }

    /// Writes an adapter file: `tensors` named `adapter.layers.{i}.*`, plus the metadata.
    pub fn save(path: &Path, tensors: &HashMap<String, Tensor>, manifest: &Manifest, layers: usize, training: &serde_json::Value) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("split_id".to_string(), manifest.split_id.clone());
        meta.insert("base_model_hash".to_string(), manifest.source.content_hash.clone());
        meta.insert("layers".to_string(), layers.to_string());
        meta.insert("hidden_size".to_string(), manifest.hidden_size.to_string());
        meta.insert("architecture".to_string(), serde_json::to_string(&manifest.config).unwrap_or_default());
        meta.insert("training".to_string(), training.to_string());
        let tmp = path.with_extension("partial");
        safetensors::serialize_to_file(tensors.iter(), Some(meta), &tmp)
            .map_err(|e| Error::bad_file(&tmp, format!("cannot write adapter: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.num_layers()
    }
}
