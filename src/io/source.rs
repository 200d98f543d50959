//! Model sources: where `--model` points, and one loader per format.
//!
//! - a local Hugging Face directory (`config.json`, `model.safetensors` or a sharded
//!   `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`);
//! - a hub id `org/name[@revision]`, resolved through hf-hub's cache (honouring `HF_HOME` and
//!   `HF_HUB_OFFLINE`) into such a directory;
//! - a GGUF file (llama, mistral or qwen2 architecture), dequantized, its tokenizer rebuilt from
//!   the metadata.
//!
//! Every loader yields a [`LoadedModel`] whose weights answer to Hugging Face tensor names, so the
//! engine's `VarBuilder` tree is the same for every format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::{Family, HfConfig, ModelConfig, RopeStyle};
use crate::util::digest::sha256_files;
use crate::error::{Error, Result};
use crate::io::tokenizer::HatTokenizer;

/// The default model's hub id.
pub const DEFAULT_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// Where `recipes/fetch-assets.sh` puts the default model (relative to the assets folder).
pub const DEFAULT_ASSET_DIR: &str = "SmolLM2-135M-Instruct";
pub const DEFAULT_ASSET_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// What `--model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    HfDir(PathBuf),
    Gguf(PathBuf),
    Hub { repo: String, revision: Option<String> },
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::HfDir(p) | ModelSpec::Gguf(p) => write!(f, "{}", p.display()),
            ModelSpec::Hub { repo, revision: Some(r) } => write!(f, "{repo}@{r}"),
            ModelSpec::Hub { repo, revision: None } => write!(f, "{repo}"),
        }
    }
}

/// The assets folder: `$HAT_ASSETS`, else `./assets`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("HAT_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("assets"))
}

impl ModelSpec {
    /// Parses a `--model` value: an existing path (directory or `.gguf` file) or a hub id.
    pub fn parse(s: &str) -> Result<Self> {
        let path = Path::new(s);
        if path.is_dir() {
            if !path.join("config.json").exists() {
                return Err(Error::bad_file(
                    path,
                    "not a Hugging Face model directory (no config.json); hat split bundles are \
                     loaded with --bundle",
                ));
            }
            return Ok(ModelSpec::HfDir(path.to_path_buf()));
        }
        if path.is_file() {
            return Ok(ModelSpec::Gguf(path.to_path_buf()));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (s, None),
        };
        let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((org, name)) if valid(org) && valid(name) && revision.as_deref() != Some("") => {
                Ok(ModelSpec::Hub { repo: repo.to_string(), revision })
            }
            _ => Err(Error::invalid(format!(
                "--model '{s}' is neither an existing file or directory nor a hub id of the form org/name[@revision]"
            ))),
        }
    }

    /// The default model: `$HAT_MODEL`, else the fetched assets (Hugging Face directory, then
    /// GGUF), else the hub id.
    pub fn default_model() -> Result<Self> {
        if let Ok(m) = std::env::var("HAT_MODEL") {
            return Self::parse(&m);
        }
        let assets = assets_dir();
        let dir = assets.join(DEFAULT_ASSET_DIR);
        if dir.join("config.json").exists() {
            return Ok(ModelSpec::HfDir(dir));
        }
        let gguf = assets.join(DEFAULT_ASSET_GGUF);
        if gguf.is_file() {
            return Ok(ModelSpec::Gguf(gguf));
        }
        Ok(ModelSpec::Hub { repo: DEFAULT_HUB_ID.to_string(), revision: None })
    }

    /// `--model` if given, else the default.
    pub fn from_arg(arg: Option<&str>) -> Result<Self> {
        arg.map_or_else(Self::default_model, Self::parse)
    }
}

/// Model weights by Hugging Face tensor name.
#[derive(Debug, Clone)]
pub enum Weights {
    /// Memory-mapped safetensors files, read on demand.
    Safetensors(Vec<PathBuf>),
    /// Tensors already in memory (e.g. dequantized GGUF).
    Tensors(HashMap<String, Tensor>),
}

impl Weights {
    /// A `VarBuilder` that converts to `dtype` on `device` as tensors are taken.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            // SAFETY: the files are not modified while mapped (hat never writes to its sources).
            Weights::Safetensors(paths) => Ok(unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device)? }),
            Weights::Tensors(map) => Ok(VarBuilder::from_tensors(map.clone(), dtype, device)),
        }
    }

    /// The stored dtype of each tensor, by name.
    pub fn dtypes(&self) -> Result<HashMap<String, DType>> {
        match self {
            Weights::Safetensors(paths) => {
                // SAFETY: as above.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths)? };
                st.tensors()
                    .into_iter()
                    .map(|(name, view)| Ok((name, DType::try_from(view.dtype())?)))
                    .collect()
            }
            Weights::Tensors(map) => Ok(map.iter().map(|(k, t)| (k.clone(), t.dtype())).collect()),
        }
    }
}

/// A model ready to build engines from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: HatTokenizer,
    /// How the user named it.
    pub name: String,
    /// The files whose bytes define the model (hashed for the split id).
    pub content_files: Vec<PathBuf>,
}

impl LoadedModel {
    /// Loads a model from any source.
    pub fn load(spec: &ModelSpec) -> Result<Self> {
        match spec {
            ModelSpec::HfDir(dir) => load_hf_dir(dir, &spec.to_string()),
            ModelSpec::Gguf(path) => load_gguf(path),
            ModelSpec::Hub { repo, revision } => {
                let dir = crate::io::hub::snapshot(repo, revision.as_deref())?;
                load_hf_dir(&dir, &spec.to_string())
            }
        }
    }

    /// SHA-256 over the files that define the model (weights and config).
    pub fn content_hash(&self) -> Result<String> {
        sha256_files(&self.content_files)
    }

    /// The whole model, as the engine runs it.
    pub fn model(&self, dtype: DType, device: &Device) -> Result<crate::model::Model> {
        crate::model::Model::load(&self.weights.var_builder(dtype, device)?, &self.config)
    }
}

/// The safetensors files of a Hugging Face directory: `model.safetensors`, or the shards listed
/// in `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::bad_file(dir, "has neither model.safetensors nor model.safetensors.index.json"));
    }
    let files = shard_names(&index)?;
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(Error::bad_file(missing, "shard listed in model.safetensors.index.json is missing"));
    }
    Ok(files)
}

/// The shard files named by a `model.safetensors.index.json`, sorted, each once.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "no weight_map object"))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn load_hf_dir(dir: &Path, name: &str) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, format!("invalid model config: {e}")))?;
    let config = hf.into_model_config().map_err(|e| match e {
        Error::InvalidInput(m) => Error::bad_file(&cfg_path, m),
        other => other,
    })?;
    let files = safetensors_files(dir)?;
    let tokenizer = HatTokenizer::from_hf_dir(dir)?;
    let mut content_files = vec![cfg_path];
    content_files.extend(files.iter().cloned());
    Ok(LoadedModel { config, weights: Weights::Safetensors(files), tokenizer, name: name.to_string(), content_files })
}

/// GGUF tensor name → Hugging Face tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

fn gguf_config(content: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let md = &content.metadata;
    let bad = |r: String| Error::bad_file(path, r);
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("GGUF metadata has no general.architecture".into()))?;
    let family = Family::from_name(&arch)?;
    let get = |key: &str| md.get(&format!("{arch}.{key}"));
    let req_u = |key: &str| -> Result<usize> {
        get(key)
            .and_then(|v| v.to_u32().ok().or_else(|| v.to_u64().ok().map(|x| x as u32)))
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("GGUF metadata has no {arch}.{key}")))
    };
    let heads = req_u("attention.head_count")?;
    let hidden = req_u("embedding_length")?;
    let head_dim = req_u("attention.key_length").unwrap_or(hidden / heads.max(1));
    if let Ok(rope_dim) = req_u("rope.dimension_count") {
        if rope_dim != head_dim {
            return Err(bad(format!("partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported")));
        }
    }
    let vocab = match req_u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.to_vec().ok())
            .map(Vec::len)
            .ok_or_else(|| bad("GGUF metadata gives no vocabulary size".into()))?,
    };
    let cfg = ModelConfig {
        family,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: req_u("feed_forward_length")?,
        num_hidden_layers: req_u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: req_u("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        rms_norm_eps: get("attention.layer_norm_rms_epsilon").and_then(|v| v.to_f32().ok()).unwrap_or(1e-5) as f64,
        rope_theta: get("rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0),
        // llama.cpp permutes Q/K rows of Llama/Mistral for interleaved rope; Qwen2 keeps NEOX.
        rope_style: if family == Family::Qwen2 { RopeStyle::Half } else { RopeStyle::Interleaved },
        rope_scaling: None,
        max_position_embeddings: req_u("context_length").unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::bad_file(path, format!("not a readable GGUF file: {e}")))?;
    let config = gguf_config(&content, path)?;
    let tokenizer = HatTokenizer::from_gguf(&content, path)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::with_capacity(names.len());
    for name in names {
        let hf = hf_name(name).ok_or_else(|| {
            Error::bad_file(path, format!("GGUF tensor '{name}' is not part of a Llama-family model hat understands"))
        })?;
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::bad_file(path, format!("tensor {name}: {e} (truncated or corrupt file?)")))?;
        let t = q.dequantize(&Device::Cpu)?;
        tensors.insert(hf, t);
    }
    Ok(LoadedModel {
        config,
        weights: Weights::Tensors(tensors),
        tokenizer,
        name: path.display().to_string(),
        content_files: vec![path.to_path_buf()],
    })
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA device 0 when built with it and present).
pub fn select_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => Ok(Device::new_cuda(0)?),
        "auto" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(
                    "this hat was built without CUDA (rebuild with `--features cuda`) or no GPU is present",
                ));
            }
            let n = s.strip_prefix("cuda:").map(str::parse::<usize>).transpose().map_err(|_| {
                Error::invalid(format!("--device '{s}': expected cuda:N with N a number"))
            })?;
            Ok(Device::new_cuda(n.unwrap_or(0))?)
        }
        other => Err(Error::invalid(format!("--device '{other}': expected cpu, cuda, cuda:N or auto"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spec_parsing() {
        assert_eq!(
            ModelSpec::parse("HuggingFaceTB/SmolLM2-135M-Instruct@main").unwrap(),
            ModelSpec::Hub { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: Some("main".into()) }
        );
        assert!(ModelSpec::parse("no-such-file.gguf").is_err());
        assert!(ModelSpec::parse("a/b/c").is_err());
        assert!(ModelSpec::parse("org/name@").is_err());
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.12.attn_q.bias").unwrap(), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("blk.3.ffn_down.weight").unwrap(), "model.layers.3.mlp.down_proj.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
