//! What a split is: the plan (where each layer runs), the split id, and the manifest each bundle
//! carries.

use std::ops::Range;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::util::digest::sha256;

/// Version of the bundle layout; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Where each layer runs: a validated cut of `num_layers` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlan {
    pub num_layers: usize,
    /// K1: layers `[0, K1)` on the device, before the cloud.
    pub input_layers: usize,
    /// K2: layers `[L-K2, L)` on the device, after the cloud.
    pub output_layers: usize,
}

impl SplitPlan {
    /// Validates `1 <= K1`, `1 <= K2`, `K1 + K2 < L` (the cloud keeps at least one layer).
    pub fn new(num_layers: usize, input_layers: usize, output_layers: usize) -> Result<Self> {
        if input_layers < 1 {
            return Err(Error::invalid("--input-layers must be at least 1: the embedding alone would reveal the tokens"));
        }
        if output_layers < 1 {
            return Err(Error::invalid("--output-layers must be at least 1: the head alone would let the cloud read the logits"));
        }
        if input_layers + output_layers >= num_layers {
            return Err(Error::invalid(format!(
                "--input-layers {input_layers} + --output-layers {output_layers} must be less than the model's \
                 {num_layers} layers, so that the cloud runs at least one"
            )));
        }
        Ok(Self { num_layers, input_layers, output_layers })
    }

    pub fn input_range(&self) -> Range<usize> {
        0..self.input_layers
    }

    pub fn middle_range(&self) -> Range<usize> {
        self.input_layers..self.num_layers - self.output_layers
    }

    pub fn output_range(&self) -> Range<usize> {
        self.num_layers - self.output_layers..self.num_layers
    }

    /// The split id: 32 hex digits of SHA-256 over the model's content hash and the ranges.
    pub fn split_id(&self, content_hash: &str) -> String {
        let (i, m, o) = (self.input_range(), self.middle_range(), self.output_range());
        let text = format!(
            "hat-split/v{FORMAT_VERSION}\n{content_hash}\n{}\n{}..{}\n{}..{}\n{}..{}\n",
            self.num_layers, i.start, i.end, m.start, m.end, o.start, o.end
        );
        sha256(text.as_bytes())[..32].to_string()
    }

    /// Which bundle a checkpoint tensor belongs to; `None` for tensors no bundle needs.
    pub(crate) fn place(&self, name: &str, tied: bool) -> Result<Option<Role>> {
        if name == "model.embed_tokens.weight" || name == "model.norm.weight" {
            return Ok(Some(Role::Device));
        }
        if name == "lm_head.weight" {
            return Ok((!tied).then_some(Role::Device));
        }
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (layer, param) = rest.split_once('.').unwrap_or((rest, ""));
            if param.ends_with("rotary_emb.inv_freq") {
                return Ok(None); // recomputed from the config
            }
            if let Ok(layer) = layer.parse::<usize>() {
                if self.middle_range().contains(&layer) {
                    return Ok(Some(Role::Cloud));
                }
                if layer < self.num_layers {
                    return Ok(Some(Role::Device));
                }
            }
        }
        Err(Error::invalid(format!("checkpoint tensor '{name}' belongs to no part of a Llama-family model")))
    }
}

/// Which half a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Cloud,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Device => "device",
            Role::Cloud => "cloud",
        })
    }
}

/// Where a split came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    /// SHA-256 over the model's defining files.
    pub content_hash: String,
}

/// `manifest.json` of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub role: Role,
    pub split_id: String,
    pub source: SourceInfo,
    pub plan: SplitPlan,
    /// Layer ranges, `[start, end)`, for readers of the JSON.
    pub input_layers: [usize; 2],
    pub middle_layers: [usize; 2],
    pub output_layers: [usize; 2],
    pub hidden_size: usize,
    /// Storage dtype of the weights: f32, f16 or bf16.
    pub dtype: String,
    pub config: ModelConfig,
    pub weights_file: String,
    /// SHA-256 of the weights file.
    pub weights_sha256: String,
}

/// Parses a storage dtype name.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid(format!("dtype '{other}': expected f32, f16 or bf16"))),
    }
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}
