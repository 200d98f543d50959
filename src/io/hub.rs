//! The Hugging Face hub, through hf-hub: resolve `org/name[@revision]` to a local snapshot
//! directory, from the cache (`HF_HOME`) or by downloading. `HF_HUB_OFFLINE=1` uses the cache only.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Files a model directory needs; the weights are added from the index if sharded.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];

/// Whether `HF_HUB_OFFLINE` asks for no network.
pub fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok(v) if !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn repo(id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::new(id.to_string(), RepoType::Model),
    }
}

/// Resolves one file: the cache first, then (unless offline) a download.
fn fetch(id: &str, revision: Option<&str>, file: &str) -> Result<Option<PathBuf>> {
    let cache = Cache::from_env();
    if let Some(p) = cache.repo(repo(id, revision)).get(file) {
        return Ok(Some(p));
    }
    if offline() {
        return Ok(None);
    }
    let api = ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))?;
    match api.repo(repo(id, revision)).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(hf_hub::api::sync::ApiError::RequestError(e)) if is_not_found(&e) => Ok(None),
        Err(e) => Err(Error::Hub(format!(
            "cannot fetch {file} of {id} from the Hugging Face hub: {e}. If the model is elsewhere, \
             pass its local directory or GGUF file to --model (recipes/fetch-assets.sh fetches the default one)"
        ))),
    }
}

fn is_not_found(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Status(404, _))
}

/// Resolves a hub model to a local directory holding its config, tokenizer and weights.
pub fn snapshot(id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let missing = |file: &str| {
        let cache = Cache::from_env();
        if offline() {
            Error::Hub(format!(
                "{id}: {file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; \
                 unset it to download, or pass a local directory or GGUF file to --model",
                cache.path().display()
            ))
        } else {
            Error::Hub(format!("{id}: the hub has no {file} for this model"))
        }
    };
    let mut dir: Option<PathBuf> = None;
    for file in REQUIRED {
        let p = fetch(id, revision, file)?.ok_or_else(|| missing(file))?;
        dir.get_or_insert_with(|| p.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for file in OPTIONAL {
        fetch(id, revision, file)?;
    }
    let dir = dir.ok_or_else(|| missing("config.json"))?;
    if fetch(id, revision, "model.safetensors")?.is_none() {
        let index = fetch(id, revision, "model.safetensors.index.json")?
            .ok_or_else(|| missing("model.safetensors (or model.safetensors.index.json)"))?;
        let shards = crate::io::source::shard_names(&index)?;
        for shard in shards {
            fetch(id, revision, &shard)?.ok_or_else(|| missing(&shard))?;
        }
    }
    Ok(dir)
}
