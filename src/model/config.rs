//! Model configuration: the serde structs that mirror checkpoint files (`config.json`) kept apart
//! from the validated runtime [`ModelConfig`] the engine uses.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architectures hat runs, as a sentence for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "Llama (LlamaForCausalLM, incl. SmolLM), Mistral (MistralForCausalLM) and Qwen2 (Qwen2ForCausalLM)";

/// Model families: all Llama-style decoders that differ only in details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    /// Maps a Hugging Face `model_type` / GGUF `general.architecture` name to a family.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "smollm" => Ok(Family::Llama),
            "mistral" | "mistralforcausallm" => Ok(Family::Mistral),
            "qwen2" | "qwen2forcausallm" => Ok(Family::Qwen2),
            _ => Err(Error::UnsupportedArchitecture {
                found: name.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            }),
        }
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints.
    Half,
    /// Pairs `(2i, 2i + 1)`: llama.cpp's GGUF permutes the Q/K rows of Llama models for this.
    Interleaved,
}

/// Llama 3.x frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The validated configuration the engine runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    #[serde(default)]
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry biases (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    /// Checks the invariants the engine relies on.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let positive = [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
            ("max_position_embeddings", c.max_position_embeddings),
        ];
        if let Some(name) = crate::error::first_zero(&positive) {
            return Err(Error::invalid(format!("model config: {name} must be positive")));
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(Error::invalid(format!(
                "model config: {} attention heads are not a multiple of {} key/value heads",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if c.head_dim % 2 != 0 {
            return Err(Error::invalid(format!("model config: head_dim {} is odd", c.head_dim)));
        }
        if !(c.rms_norm_eps > 0.0) || !(c.rope_theta > 0.0) {
            return Err(Error::invalid("model config: rms_norm_eps and rope_theta must be positive"));
        }
        Ok(())
    }

    /// Key/value projection width: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query projection width: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}

/// `config.json` of a Hugging Face checkpoint, as much of it as hat reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    /// The family, from `model_type` or else the first of `architectures`.
    pub fn family(&self) -> Result<Family> {
        match (&self.model_type, self.architectures.first()) {
            (Some(t), _) => Family::from_name(t),
            (None, Some(a)) => Family::from_name(a),
            (None, None) => Err(Error::UnsupportedArchitecture {
                found: "(config.json names neither model_type nor architectures)".into(),
                supported: SUPPORTED_ARCHITECTURES,
            }),
        }
    }

    /// Validates and converts to the runtime config (half-split rope: HF layout).
    pub fn into_model_config(self) -> Result<ModelConfig> {
        let family = self.family()?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(Error::invalid(format!(
                    "model config: hidden_act '{act}' is not supported (hat runs SiLU-gated MLPs)"
                )));
            }
        }
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v)?),
        };
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let cfg = ModelConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Half,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias.unwrap_or(family == Family::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Token ids named by `eos_token_id` (a number or a list of numbers).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        json_ids(self.eos_token_id.as_ref())
    }
}

/// Reads a token-id field that may be a number or a list of numbers.
pub(crate) fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Llama3RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("(none)");
    if kind != "llama3" {
        return Err(Error::invalid(format!(
            "model config: rope_scaling type '{kind}' is not supported (hat supports 'llama3')"
        )));
    }
    let num = |k: &str| {
        v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
            Error::invalid(format!("model config: rope_scaling.{k} is missing or not a number"))
        })
    };
    Ok(Llama3RopeScaling {
        factor: num("factor")? as f32,
        low_freq_factor: num("low_freq_factor")? as f32,
        high_freq_factor: num("high_freq_factor")? as f32,
        original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_architecture_names_the_supported_ones() {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2
        }))
        .unwrap();
        let err = cfg.into_model_config().unwrap_err().to_string();
        assert!(err.contains("gpt_neox") && err.contains("Qwen2"), "{err}");
    }

    #[test]
    fn qwen2_gets_attention_bias_and_gqa_defaults() {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "eos_token_id": [3, 4]
        }))
        .unwrap();
        assert_eq!(cfg.eos_token_ids(), [3, 4]);
        let cfg = cfg.into_model_config().unwrap();
        assert!(cfg.attention_bias);
        assert_eq!((cfg.head_dim, cfg.kv_dim()), (4, 4));
    }
}
