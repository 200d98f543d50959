//! The shared set-up of tests and benchmarks: a model split in a temporary folder with both
//! bundles loaded, a cloud serving its half on loopback, and edges connected to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::cloud::{BackgroundServer, CloudConfig};
use crate::error::{Error, Result};
use crate::io::source::{assets_dir, LoadedModel, DEFAULT_ASSET_GGUF};
use crate::net::protocol::WireDtype;
use crate::net::tls::Trust;
use crate::net::{ConnectOptions, FrameTap, LinkEmulation, QuicLink};
use crate::split::{write_split, CloudBundle, DeviceBundle, SplitPlan};

/// The default model's GGUF: `$HAT_TEST_MODEL`, else the one `recipes/fetch-assets.sh` fetched
/// into the repository's assets folder. An error says how to get it when it is missing.
pub fn default_gguf() -> Result<PathBuf> {
    let path = std::env::var("HAT_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        // assets_dir() is relative to the package root unless HAT_ASSETS is set.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(assets_dir()).join(DEFAULT_ASSET_GGUF)
    });
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::invalid(format!("the default model is missing at {}: run recipes/fetch-assets.sh", path.display())))
    }
}

/// A model split into `dir/split/{device,cloud}` (f32), both bundles loaded.
pub struct SplitWorld {
    pub dir: tempfile::TempDir,
    pub device: DeviceBundle,
    pub cloud: Arc<CloudBundle>,
}

impl SplitWorld {
    /// Splits `model` with `input_layers` and `output_layers` on the device.
    pub fn new(model: &LoadedModel, input_layers: usize, output_layers: usize) -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("a temporary folder", e))?;
        Self::split_into(dir, model, input_layers, output_layers)
    }

    /// [`SplitWorld::new`] for a world kept in a `static` (never dropped, so its folder outlives
    /// the process): the folder goes under `parent` (a test's `CARGO_TARGET_TMPDIR`, which
    /// `cargo clean` empties) instead of the system's temporary folder, and the folders such
    /// worlds left there over an hour ago are removed first (a test binary's run takes minutes;
    /// each folder holds a split of the model, ~1 GB for the default one).
    pub fn new_in(parent: &std::path::Path, model: &LoadedModel, input_layers: usize, output_layers: usize) -> Result<Self> {
        const PREFIX: &str = "hat-world-";
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let stale = |entry: &std::fs::DirEntry| {
            entry.file_name().to_string_lossy().starts_with(PREFIX)
                && entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(3600))
        };
        for entry in std::fs::read_dir(parent).map_err(|e| Error::io(parent, e))?.flatten() {
            if stale(&entry) {
                // Best effort: a folder another process still uses (or cannot remove) stays.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tempfile::Builder::new().prefix(PREFIX).tempdir_in(parent).map_err(|e| Error::io(parent, e))?;
        Self::split_into(dir, model, input_layers, output_layers)
    }

    fn split_into(dir: tempfile::TempDir, model: &LoadedModel, input_layers: usize, output_layers: usize) -> Result<Self> {
        let out = dir.path().join("split");
        let plan = SplitPlan::new(model.config.num_hidden_layers, input_layers, output_layers)?;
        write_split(model, &plan, &out, DType::F32, false, &indicatif::ProgressBar::hidden())?;
        let device = DeviceBundle::load(&out.join("device"), &Device::Cpu)?;
        let cloud = Arc::new(CloudBundle::load(&out.join("cloud"), &Device::Cpu)?);
        Ok(Self { dir, device, cloud })
    }

    /// Where the bundles are: `DIR/device` and `DIR/cloud`.
    pub fn split_dir(&self) -> PathBuf {
        self.dir.path().join("split")
    }

    /// Starts a cloud serving this split's middle layers on loopback, its state in this world's
    /// folder under `state`.
    pub fn serve(&self, state: &str, token: Option<&str>, max_sessions: usize, max_context: usize) -> Result<BackgroundServer> {
        BackgroundServer::start(self.cloud.clone(), cloud_config(self.dir.path().join(state), token, max_sessions, max_context))
    }
}

/// A loopback cloud's settings (any free port, idle sessions closed after two minutes).
pub fn cloud_config(state_dir: PathBuf, token: Option<&str>, max_sessions: usize, max_context: usize) -> CloudConfig {
    CloudConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        state_dir,
        token: token.map(str::to_string),
        max_sessions,
        max_context,
        idle_timeout: Duration::from_secs(120),
        write_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        // A made-up cost model (tests that plan give their own).
        cost: crate::sched::CloudModel {
            middle: crate::sched::StageCost { fixed_ms: 0.2, per_row_ms: 0.05, per_row_ctx_ms: 0.0, ..Default::default() },
            slowdown: vec![1.0, 2.0],
        },
        metrics: None,
        batching: true,
        batch_rows: crate::model::kernels::EXACT_ROWS,
        pass_delay: Duration::ZERO,
    }
}

/// An edge session with `server` for `device`'s split, pinned to the server's certificate.
pub fn connect(server: &BackgroundServer, device: &DeviceBundle, dtype: WireDtype, emulation: LinkEmulation, tap: Option<FrameTap>) -> Result<QuicLink> {
    QuicLink::connect(ConnectOptions {
        addr: server.addr,
        trust: Trust::Fingerprint(server.fingerprint.clone()),
        token: None,
        split_id: device.manifest.split_id.clone(),
        hidden_size: device.manifest.hidden_size,
        dtype,
        emulation,
        tap,
        connect_timeout: crate::net::CONNECT_TIMEOUT,
        runtime: None,
    })
}

/// Writes an "oracle" adapter file made of the cloud bundle's own middle layers `layers` (model
/// layer numbers), through the real adapter file format: with all middle layers the SLM is the
/// LLM and nearly every draft is accepted; with a subset, some are. With `fuse`
/// (`(hidden, 2·hidden)`), a feature-conditioned one.
pub fn oracle_adapter(
    cloud_dir: &std::path::Path,
    cloud: &CloudBundle,
    layers: std::ops::Range<usize>,
    fuse: Option<candle_core::Tensor>,
    context: crate::adapter::DraftContext,
    path: &std::path::Path,
) -> Result<()> {
    let tensors = candle_core::safetensors::load(cloud_dir.join(&cloud.manifest.weights_file), &Device::Cpu)?;
    let mut out = std::collections::HashMap::new();
    for (j, i) in layers.clone().enumerate() {
        let prefix = format!("model.layers.{i}.");
        for (name, t) in &tensors {
            if let Some(rest) = name.strip_prefix(&prefix) {
                out.insert(format!("adapter.layers.{j}.{rest}"), t.clone());
            }
        }
    }
    if let Some(f) = fuse {
        out.insert(crate::adapter::FUSE.to_string(), f);
    }
    let storage = crate::adapter::Storage::F16;
    crate::adapter::Adapter::save(path, &out, &cloud.manifest, layers.len(), context, storage, None, &serde_json::json!({"kind": "test oracle"}))
}
