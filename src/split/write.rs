//! Writing a split: the device and cloud bundles, each a `weights.safetensors` and a
//! `manifest.json`, made in a temporary folder and moved into place when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::source::LoadedModel;
use crate::util::digest::sha256;
use crate::split::plan::{dtype_name, Manifest, Role, SourceInfo, SplitPlan, FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE};

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
