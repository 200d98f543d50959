//! `hat profile`: measured costs of the device, the cloud and the link, fitted into the cost
//! models the chunk planner ([`crate::sched`]) predicts TTFT with.
//!
//! - [`measure`]: timing each stage on blocks of several sizes at several positions;
//! - [`file`]: the versioned profile file and the per-user cache of quick profiles;
//! - [`plot`]: SVG charts of the timings, the fits and the predicted TTFT;
//! - here: fitting the timings into profiles, measuring a link through a real session, the
//!   quick profiles `serve-cloud` and `run-edge` measure when they have no profile file, and
//!   the pipeline costs of one session.
//!
//! May use [`crate::sched`], [`crate::edge`], [`crate::net`], [`crate::split`], [`crate::model`]
//! and [`crate::util`]; only the commands and [`crate::api`] use it.

pub mod file;
pub mod measure;
pub mod plot;

use std::path::Path;

use crate::edge::Drafter;
use crate::error::Result;
use crate::net::protocol::{CloudLoad, WireDtype, HIDDEN_FRAME_OVERHEAD, MIDDLE_FRAME_OVERHEAD};
use crate::net::QuicLink;
use crate::sched::{fit, CloudModel, LinkEstimate, PipelineCosts};
use crate::split::{CloudBundle, DeviceBundle};
pub use file::{cache_dir, CloudProfile, DeviceProfile, LinkProfile, Profile, StageTimings, PROFILE_VERSION};
pub use measure::Grid;

/// Measures and fits the device's stages.
pub fn profile_device(dev: &DeviceBundle, drafter: &Drafter, grid: &Grid, tick: &mut (dyn FnMut() + Send)) -> Result<DeviceProfile> {
    // On a thread of the compute pool, as the edge computes (`in_pool`).
    let t = crate::util::threads::in_pool(|| measure::device(dev, drafter, grid, tick))?;
    let small = regimes(&dev.manifest.config);
    Ok(DeviceProfile {
        input: fit(&t.input, small)?,
        output: fit(&t.output, small)?,
        draft_prefill: fit(&t.draft_prefill, small)?,
        head_ms: t.head_ms,
        draft_conditioned: drafter.adapter.is_conditioned(),
        adapter_layers: drafter.adapter.num_layers(),
        draft_step_ms: t.draft_step_ms,
        timings: StageTimings { input: t.input, output: t.output, draft_prefill: t.draft_prefill },
    })
}

/// Measures and fits the cloud's middle layers (alone and under concurrent blocks).
pub fn profile_cloud(bundle: &CloudBundle, grid: &Grid, tick: &mut (dyn FnMut() + Send)) -> Result<CloudProfile> {
    let t = measure::cloud(bundle, grid, tick)?;
    let small = regimes(&bundle.manifest.config);
    Ok(CloudProfile { middle: fit(&t.middle, small)?, slowdown: t.slowdown, timings: t.middle })
}

/// The engine's kernel regimes for a model (see [`crate::sched::cost`]).
fn regimes(cfg: &crate::model::ModelConfig) -> crate::sched::Regimes {
    let (matmul_rows, attention_rows) = crate::model::kernel_regimes(cfg);
    crate::sched::Regimes { matmul_rows, attention_rows }
}

/// Probe sizes: the full profile and the quick one (and a session measuring its own link).
pub const PROBE_BYTES: usize = 256 << 10;
pub const QUICK_PROBE_BYTES: usize = 64 << 10;

/// Measures the link through an open session (probe frames of zero padding only) and records
/// the cloud's cost model and load from its handshake.
pub fn profile_link(link: &mut QuicLink, addr: &str, quick: bool) -> Result<LinkProfile> {
    let estimate = link.measure_link(if quick { QUICK_PROBE_BYTES } else { PROBE_BYTES }, if quick { 3 } else { 8 })?;
    Ok(LinkProfile { cloud_addr: addr.to_string(), estimate, cloud: link.cloud_model.clone(), cloud_load: link.welcome_load })
}

/// A cached quick profile's file name: split, threads, the kernels
/// ([`crate::model::kernels::kernels_tag`]) and the draft path it was measured with.
fn cache_name(kind: &str, split_id: &str, detail: &str) -> String {
    format!("profile-{kind}-{split_id}-t{}-{}{detail}.json", crate::util::threads::count(), crate::model::kernels::kernels_tag())
}

/// Reads a cached profile if it matches; `None` when absent or stale (it is measured again).
fn cached(path: &Path, split_id: &str) -> Option<Profile> {
    let p = Profile::load(path, split_id).ok()?;
    (p.threads == crate::util::threads::count()).then_some(p)
}

/// Where a profile came from (reported by the commands).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(std::path::PathBuf),
    Cached(std::path::PathBuf),
    Measured(Option<std::path::PathBuf>),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Cached(p) => write!(f, "cached quick profile {}", p.display()),
            Source::Measured(Some(p)) => write!(f, "quick profile measured now, cached in {}", p.display()),
            Source::Measured(None) => write!(f, "quick profile measured now (not cached)"),
        }
    }
}

/// The device profile `run-edge` plans with: the `--profile` file's, else a cached quick one,
/// else a quick one measured now (and cached unless the cache is off).
pub fn device_profile(dev: &DeviceBundle, drafter: &Drafter, file: Option<&Profile>, file_path: Option<&Path>) -> Result<(DeviceProfile, Source)> {
    if let (Some(p), Some(path)) = (file, file_path) {
        if let Some(d) = &p.device {
            return Ok((d.clone(), Source::File(path.to_path_buf())));
        }
    }
    let split = &dev.manifest.split_id;
    let detail = format!("-a{}{}{}", drafter.adapter.num_layers(), if drafter.adapter.is_conditioned() { "c" } else { "" }, if drafter.options.int8 { "-q8" } else { "" });
    let path = cache_dir().map(|d| d.join(cache_name("device", split, &detail)));
    if let Some(p) = path.as_deref().and_then(|p| cached(p, split)) {
        if let Some(d) = p.device {
            return Ok((d, Source::Cached(path.unwrap_or_default())));
        }
    }
    let device = profile_device(dev, drafter, &Grid::quick(), &mut || {})?;
    let mut profile = Profile::new(split, &dev.manifest.source.name, dev.manifest.hidden_size, crate::util::threads::count(), true);
    profile.device = Some(device.clone());
    let saved = path.filter(|p| profile.save(p).is_ok());
    Ok((device, Source::Measured(saved)))
}

/// The cost model `serve-cloud` tells its edges: the `--profile` file's, else a cached quick
/// one in `state_dir`, else a quick one measured now and kept there.
pub fn cloud_model(bundle: &CloudBundle, file: Option<&Path>, state_dir: &Path) -> Result<(CloudModel, Source)> {
    let split = &bundle.manifest.split_id;
    if let Some(path) = file {
        let p = Profile::load(path, split)?;
        let c = p.cloud.ok_or_else(|| crate::error::Error::invalid(format!("the profile {} has no cloud part (measure it with `hat profile --bundle DIR/cloud`)", path.display())))?;
        return Ok((c.model(), Source::File(path.to_path_buf())));
    }
    let path = state_dir.join(cache_name("cloud", split, ""));
    if let Some(c) = cached(&path, split).and_then(|p| p.cloud) {
        return Ok((c.model(), Source::Cached(path)));
    }
    let cloud = profile_cloud(bundle, &Grid::quick(), &mut || {})?;
    let mut profile = Profile::new(split, &bundle.manifest.source.name, bundle.manifest.hidden_size, crate::util::threads::count(), true);
    profile.cloud = Some(cloud.clone());
    let saved = profile.save(&path).ok().map(|_| path);
    Ok((cloud.model(), Source::Measured(saved)))
}

/// The pipeline of one session's prefill: the device's stages, the cloud's model under the
/// other sessions' `load` ([`CloudModel::under_load`]), the link, and the frame sizes.
pub fn pipeline_costs(device: &DeviceProfile, cloud: &CloudModel, load: &CloudLoad, link: LinkEstimate, wire: WireDtype, hidden: usize, drafting: bool) -> PipelineCosts {
    let row = (hidden * wire.size()) as f64;
    PipelineCosts {
        input: device.input.cost,
        output: device.output.cost,
        head_ms: device.head_ms,
        draft_prefill: drafting.then_some(device.draft_prefill.cost),
        draft_conditioned: device.draft_conditioned,
        cloud: cloud.under_load(load.busy as f64, load.block_ms as f64),
        link,
        up_bytes_per_row: row,
        up_bytes_per_frame: HIDDEN_FRAME_OVERHEAD as f64,
        down_bytes_per_row: row,
        down_bytes_per_frame: MIDDLE_FRAME_OVERHEAD as f64,
    }
}

/// How a session's prefill was planned.
#[derive(Debug, Clone)]
pub struct SessionPlan {
    pub plan: crate::sched::ChunkPlan,
    /// The link the plan assumed, and where its figures came from.
    pub link: LinkEstimate,
    pub link_source: &'static str,
    /// Time spent probing the link in this session (0 when the profile had it), ms.
    pub probe_ms: f64,
    pub device_source: Source,
    /// The cloud's load the plan assumed (the other sessions', from the handshake).
    pub cloud_load: CloudLoad,
}

/// Chunk size when planning fails (no usable cost model).
pub const FALLBACK_CHUNK: usize = 128;

/// How a session cuts its prompt into prefill chunks.
#[derive(Debug, Clone)]
pub struct ChunkChoice {
    pub chunking: crate::edge::Chunking,
    /// The plan, when the chunks were planned.
    pub plan: Option<SessionPlan>,
    /// Why planning failed, when it did (the prompt then goes in chunks of [`FALLBACK_CHUNK`]).
    pub warning: Option<String>,
}

/// The chunking of a `len`-position prompt on an open session: chunks of `size` positions when
/// it is given (0 = the whole prompt at once), else planned with [`plan_session`]. Planning is an
/// optimisation: when it fails the prompt goes in chunks of [`FALLBACK_CHUNK`] and the reason is
/// returned beside.
#[allow(clippy::too_many_arguments)]
pub fn choose_chunking(dev: &DeviceBundle, drafter: &Drafter, link: &mut QuicLink, profile: Option<(&Profile, &Path)>, len: usize, wire: WireDtype, drafting: bool, size: Option<usize>) -> ChunkChoice {
    use crate::edge::Chunking;
    match size {
        Some(n) => ChunkChoice { chunking: Chunking::Fixed(n), plan: None, warning: None },
        None => match plan_session(dev, drafter, link, profile, len, wire, drafting) {
            Ok(p) => ChunkChoice { chunking: Chunking::Planned(p.plan.chunks.clone()), plan: Some(p), warning: None },
            Err(e) => ChunkChoice {
                chunking: Chunking::Fixed(FALLBACK_CHUNK),
                plan: None,
                warning: Some(format!("cannot plan the prompt's chunks ({e}); using chunks of {FALLBACK_CHUNK}")),
            },
        },
    }
}

/// Plans the prefill of a `len`-position prompt on an open session: the device profile
/// ([`device_profile`]), the cloud's cost model and load from the handshake, and the link: the
/// profile's throughputs with the round trip refreshed from this session's handshake, or, when
/// the profile has no link, measured now with probes of zero padding. Call before the first
/// block is sent.
pub fn plan_session(dev: &DeviceBundle, drafter: &Drafter, link: &mut QuicLink, profile: Option<(&Profile, &Path)>, len: usize, wire: WireDtype, drafting: bool) -> Result<SessionPlan> {
    let (device, device_source) = device_profile(dev, drafter, profile.map(|p| p.0), profile.map(|p| p.1))?;
    link.cloud_model.middle.validate("the cloud's middle layers (from the handshake)")?;
    let handshake_rtt = link.handshake_rtt.as_secs_f64() * 1e3;
    let (estimate, link_source, probe_ms) = match profile.and_then(|p| p.0.link.as_ref()) {
        Some(l) => (LinkEstimate { rtt_ms: handshake_rtt, ..l.estimate }, "profile, round trip from the handshake", 0.0),
        None => {
            let t = std::time::Instant::now();
            let mut e = link.measure_link(QUICK_PROBE_BYTES, 2)?;
            e.rtt_ms = e.rtt_ms.min(handshake_rtt);
            (e, "probed in this session", t.elapsed().as_secs_f64() * 1e3)
        }
    };
    let load = link.welcome_load;
    let costs = pipeline_costs(&device, &link.cloud_model, &load, estimate, wire, dev.manifest.hidden_size, drafting);
    Ok(SessionPlan { plan: crate::sched::plan(&costs, len), link: estimate, link_source, probe_ms, device_source, cloud_load: load })
}
