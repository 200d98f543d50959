//! The profile file: versioned JSON with the split it was measured on, the threads, the fitted
//! cost models with their residuals, the raw timings, and the link figures.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sched::{CloudModel, FittedStage, LinkEstimate, Timing};

/// Bumped when the file's meaning changes; other versions are refused.
pub const PROFILE_VERSION: u32 = 1;

/// A profile of one split: the device, the cloud, the link, or any of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub split_id: String,
    /// The model the split was made from (for people reading the file).
    pub model: String,
    /// Its hidden size (bytes per position on the wire follow from it).
    pub hidden_size: usize,
    /// Compute threads it was measured with.
    pub threads: usize,
    /// Measured with `--quick`.
    pub quick: bool,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub device: Option<DeviceProfile>,
    pub cloud: Option<CloudProfile>,
    pub link: Option<LinkProfile>,
}

/// The device's stages, fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// Embedding + input submodel.
    pub input: FittedStage,
    /// Output submodel.
    pub output: FittedStage,
    /// The head on one position, ms.
    pub head_ms: f64,
    /// The draft path's prefill (adapter, and the draft output submodel if it keeps a cache).
    pub draft_prefill: FittedStage,
    /// Whether the draft path waits for middle outputs (a feature-conditioned adapter).
    pub draft_conditioned: bool,
    /// Adapter layers it was measured with.
    pub adapter_layers: usize,
    /// One draft step, ms.
    pub draft_step_ms: f64,
    pub timings: StageTimings,
}

/// Raw timings of the device's stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    pub input: Vec<Timing>,
    pub output: Vec<Timing>,
    pub draft_prefill: Vec<Timing>,
}

/// The cloud's middle layers, fitted, and its slowdown under concurrent blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudProfile {
    pub middle: FittedStage,
    /// `slowdown[k - 1]`: a block's time with k computing at once / alone.
    pub slowdown: Vec<f64>,
    pub timings: Vec<Timing>,
}

impl CloudProfile {
    /// The cost model the cloud tells its edges.
    pub fn model(&self) -> CloudModel {
        CloudModel { middle: self.middle.cost, slowdown: self.slowdown.clone() }
    }
}

/// A link measured through a session with a cloud, and that cloud's cost model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    pub cloud_addr: String,
    #[serde(flatten)]
    pub estimate: LinkEstimate,
    /// The cloud's cost model from the handshake, and its load then.
    pub cloud: CloudModel,
    pub cloud_load: crate::net::protocol::CloudLoad,
}

impl Profile {
    pub fn new(split_id: &str, model: &str, hidden_size: usize, threads: usize, quick: bool) -> Self {
        let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { version: PROFILE_VERSION, split_id: split_id.into(), model: model.into(), hidden_size, threads, quick, created_unix, device: None, cloud: None, link: None }
    }

    /// Reads a profile and checks it belongs to `split_id` and this version.
    pub fn load(path: &Path, split_id: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::invalid(format!("cannot read the profile {}: {e}", path.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::invalid(format!("the profile {} is not JSON: {e}", path.display())))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != PROFILE_VERSION as u64 {
            return Err(Error::invalid(format!(
                "the profile {} has version {version}, this hat reads version {PROFILE_VERSION}: measure it again with `hat profile`",
                path.display()
            )));
        }
        let p: Profile = serde_json::from_value(value).map_err(|e| Error::invalid(format!("the profile {} is malformed: {e}", path.display())))?;
        if p.split_id != split_id {
            return Err(Error::invalid(format!(
                "the profile {} was measured on split {}, not on this bundle's split {split_id}: measure it again with `hat profile`",
                path.display(),
                p.split_id
            )));
        }
        for (what, s) in [("input", p.device.as_ref().map(|d| d.input)), ("output", p.device.as_ref().map(|d| d.output)), ("middle", p.cloud.as_ref().map(|c| c.middle))] {
            if let Some(s) = s {
                s.cost.validate(what)?;
            }
        }
        Ok(p)
    }

    /// Writes the profile (to a temporary file, then renamed: a reader never sees half).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(format!("cannot encode the profile: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| Error::invalid(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))
    }
}

/// The per-user cache of quick profiles: `$HAT_CACHE_DIR`, else `$XDG_CACHE_HOME/hat`, else
/// `~/.cache/hat`; `None` when `HAT_CACHE_DIR=off` (nothing is read or written).
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("HAT_CACHE_DIR") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(v).join("hat"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("hat"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_of_another_split_or_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        Profile::new("abc", "m", 8, 1, true).save(&path).unwrap();
        assert!(Profile::load(&path, "abc").is_ok());
        let e = Profile::load(&path, "other").unwrap_err().to_string();
        assert!(e.contains("split abc") && e.contains("other"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["version"] = 99.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Profile::load(&path, "abc").unwrap_err().to_string();
        assert!(e.contains("version 99") && e.contains(&format!("version {PROFILE_VERSION}")), "{e}");
        std::fs::write(&path, "{").unwrap();
        assert!(Profile::load(&path, "abc").unwrap_err().to_string().contains("not JSON"));
    }
}
