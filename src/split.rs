//! Cutting a model into the device and cloud bundles, and loading them back.
//!
//! A model with L layers is cut at `K1` and `L - K2`:
//! - `device/`: embedding, layers `[0, K1)` (input submodel), layers `[L-K2, L)` + final norm +
//!   LM head (output submodel), tokenizer and chat template;
//! - `cloud/`: layers `[K1, L-K2)` (middle submodel) only: no embedding, head or tokenizer.
//!
//! Each bundle is a `weights.safetensors` (Hugging Face tensor names) and a `manifest.json`
//! whose **split id** is derived from the model's content hash and the layer ranges, so both
//! halves of one split, and the same split made twice, carry the same id.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::digest::sha256;
use crate::error::{Error, Result};
use crate::model::{Embedder, Head, LayerStack, Rope};
use crate::source::LoadedModel;
use crate::tokenizer::HatTokenizer;

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
    fn place(&self, name: &str, tied: bool) -> Result<Option<Role>> {
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

fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

/// What `write_split` produced.
#[derive(Debug, Clone)]
pub struct SplitOutcome {
    pub split_id: String,
    pub device_dir: PathBuf,
    pub cloud_dir: PathBuf,
    pub device_bytes: u64,
    pub cloud_bytes: u64,
}

fn is_nonempty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Writes `out/device` and `out/cloud`. The bundles are written into a temporary sibling folder
/// and moved into place at the end, so a failure leaves `out` as it was.
pub fn write_split(
    model: &LoadedModel,
    plan: &SplitPlan,
    out: &Path,
    dtype: DType,
    force: bool,
    progress: &indicatif::ProgressBar,
) -> Result<SplitOutcome> {
    if out.is_file() {
        return Err(Error::invalid(format!("--out {} is a file, not a directory", out.display())));
    }
    if is_nonempty_dir(out) && !force {
        return Err(Error::invalid(format!(
            "--out {} is not empty; pass --force to replace its contents",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".hat-split-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;

    progress.set_message("hashing");
    let content_hash = model.content_hash()?;
    let split_id = plan.split_id(&content_hash);

    // Sort the checkpoint's tensors into the two bundles.
    let tied = model.config.tie_word_embeddings;
    let mut names: Vec<(String, Role)> = Vec::new();
    for name in model.weights.dtypes()?.into_keys() {
        if let Some(role) = plan.place(&name, tied)? {
            names.push((name, role));
        }
    }
    names.sort();
    progress.set_length(names.len() as u64 + 2);
    progress.set_message("converting");
    let vb = model.weights.var_builder(dtype, &Device::Cpu)?;
    let mut halves: HashMap<Role, HashMap<String, Tensor>> = HashMap::new();
    for (name, role) in &names {
        let t = vb.get_unchecked_dtype(name, dtype)?;
        halves.entry(*role).or_default().insert(name.clone(), t);
        progress.inc(1);
    }

    let mut sizes = HashMap::new();
    for role in [Role::Device, Role::Cloud] {
        progress.set_message(format!("writing {role}"));
        let dir = staging.path().join(role.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tensors = halves.remove(&role).unwrap_or_default();
        let weights = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &weights)?;
        let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
        sizes.insert(role, bytes.len() as u64);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            role,
            split_id: split_id.clone(),
            source: SourceInfo { name: model.name.clone(), content_hash: content_hash.clone() },
            plan: *plan,
            input_layers: [plan.input_range().start, plan.input_range().end],
            middle_layers: [plan.middle_range().start, plan.middle_range().end],
            output_layers: [plan.output_range().start, plan.output_range().end],
            hidden_size: model.config.hidden_size,
            dtype: dtype_name(dtype).to_string(),
            config: model.config.clone(),
            weights_file: WEIGHTS_FILE.to_string(),
            weights_sha256: sha256(&bytes),
        };
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::bad_file(&path, e))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        if role == Role::Device {
            model.tokenizer.save(&dir)?;
        }
        progress.inc(1);
    }

    // Move into place: the old contents (with --force) go only once the new ones are complete.
    let staged = staging.keep();
    if out.exists() {
        let old = tempfile::Builder::new().prefix(".hat-split-old-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
        let old_path = old.path().join("previous");
        std::fs::rename(out, &old_path).map_err(|e| Error::io(out, e))?;
        std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))?;
        drop(old); // removes the previous contents
    } else {
        std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))?;
    }
    progress.finish_with_message("done");
    Ok(SplitOutcome {
        split_id,
        device_dir: out.join("device"),
        cloud_dir: out.join("cloud"),
        device_bytes: sizes[&Role::Device],
        cloud_bytes: sizes[&Role::Cloud],
    })
}

/// Reads and checks a bundle's manifest.
pub fn read_manifest(dir: &Path, role: Role) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::bad_file(dir, format!("not a hat {role} bundle (no {MANIFEST_FILE}); make one with `hat split`")),
        _ => Error::io(&path, e),
    })?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("invalid manifest: {e}")))?;
    if m.format_version != FORMAT_VERSION {
        return Err(Error::bad_file(&path, format!(
            "bundle format version {} is not supported by this hat (which reads version {FORMAT_VERSION})",
            m.format_version
        )));
    }
    if m.role != role {
        return Err(Error::bad_file(dir, format!("this is a {} bundle, not a {role} bundle", m.role)));
    }
    let plan = SplitPlan::new(m.config.num_hidden_layers, m.plan.input_layers, m.plan.output_layers)
        .map_err(|e| Error::bad_file(&path, e))?;
    if plan != m.plan || m.split_id != plan.split_id(&m.source.content_hash) {
        return Err(Error::bad_file(&path, "split id does not match the layer ranges and content hash"));
    }
    m.config.validate().map_err(|e| Error::bad_file(&path, e))?;
    Ok(m)
}

fn bundle_vb(dir: &Path, m: &Manifest, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    let path = dir.join(&m.weights_file);
    if !path.exists() {
        return Err(Error::bad_file(dir, format!("weights file {} is missing", m.weights_file)));
    }
    // Compute dtype: f32 on CPU; the stored dtype on GPUs.
    let dtype = if device.is_cpu() { DType::F32 } else { parse_dtype(&m.dtype)? };
    // SAFETY: the bundle's files are not modified while mapped.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
        .map_err(|e| Error::bad_file(&path, format!("cannot read weights: {e}")))
}

/// The device's half: input submodel, output submodel, tokenizer.
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    pub manifest: Manifest,
    pub embedder: Embedder,
    /// Layers `[0, K1)`.
    pub input: LayerStack,
    /// Layers `[L-K2, L)`.
    pub output: LayerStack,
    pub head: Head,
    pub tokenizer: HatTokenizer,
    pub rope: Arc<Rope>,
}

impl DeviceBundle {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let m = read_manifest(dir, Role::Device)?;
        let vb = bundle_vb(dir, &m, device)?;
        let cfg = &m.config;
        let rope = Arc::new(Rope::new(cfg, vb.dtype(), device)?);
        let wrap = |e: Error| Error::bad_file(dir, format!("incomplete device bundle: {e}"));
        Ok(Self {
            embedder: Embedder::load(&vb, cfg).map_err(wrap)?,
            input: LayerStack::load(&vb, cfg, m.plan.input_range(), rope.clone()).map_err(wrap)?,
            output: LayerStack::load(&vb, cfg, m.plan.output_range(), rope.clone()).map_err(wrap)?,
            head: Head::load(&vb, cfg).map_err(wrap)?,
            tokenizer: HatTokenizer::from_hf_dir(dir)?,
            rope,
            manifest: m,
        })
    }
}

/// The cloud's half: the middle submodel.
#[derive(Debug, Clone)]
pub struct CloudBundle {
    pub manifest: Manifest,
    /// Layers `[K1, L-K2)`.
    pub middle: LayerStack,
}

impl CloudBundle {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let m = read_manifest(dir, Role::Cloud)?;
        let vb = bundle_vb(dir, &m, device)?;
        let rope = Arc::new(Rope::new(&m.config, vb.dtype(), device)?);
        let middle = LayerStack::load(&vb, &m.config, m.plan.middle_range(), rope)
            .map_err(|e| Error::bad_file(dir, format!("incomplete cloud bundle: {e}")))?;
        Ok(Self { manifest: m, middle })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_validation_and_ranges() {
        let p = SplitPlan::new(30, 2, 3).unwrap();
        assert_eq!((p.input_range(), p.middle_range(), p.output_range()), (0..2, 2..27, 27..30));
        assert!(SplitPlan::new(30, 0, 2).is_err());
        assert!(SplitPlan::new(30, 2, 0).is_err());
        assert!(SplitPlan::new(30, 15, 15).is_err());
        assert!(SplitPlan::new(30, 14, 15).is_ok());
    }

    #[test]
    fn split_id_depends_on_hash_and_ranges_only() {
        let p = SplitPlan::new(30, 2, 2).unwrap();
        assert_eq!(p.split_id("abc"), p.split_id("abc"));
        assert_ne!(p.split_id("abc"), p.split_id("abd"));
        assert_ne!(p.split_id("abc"), SplitPlan::new(30, 3, 2).unwrap().split_id("abc"));
        assert_eq!(p.split_id("abc").len(), 32);
    }
}
