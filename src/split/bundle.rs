//! Loading a bundle back: its manifest checked, its weights as the engine's pieces.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::io::tokenizer::HatTokenizer;
use crate::model::{Embedder, Head, LayerStack, Rope};
use crate::split::plan::{parse_dtype, Manifest, Role, SplitPlan, FORMAT_VERSION, MANIFEST_FILE};

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

/// The dtype a bundle computes in by default: f32 on the CPU (the exact, row-invariant kernels
/// are f32), the stored dtype on a GPU.
pub fn default_compute_dtype(m: &Manifest, device: &Device) -> Result<DType> {
    if device.is_cpu() {
        Ok(DType::F32)
    } else {
        parse_dtype(&m.dtype)
    }
}

fn bundle_vb(dir: &Path, m: &Manifest, device: &Device, dtype: DType) -> Result<candle_nn::VarBuilder<'static>> {
    let path = dir.join(&m.weights_file);
    if !path.exists() {
        return Err(Error::bad_file(dir, format!("weights file {} is missing", m.weights_file)));
    }
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
        let vb = bundle_vb(dir, &m, device, default_compute_dtype(&m, device)?)?;
        let cfg = &m.config;
        let rope = Arc::new(Rope::new(cfg, vb.dtype(), device)?);
        let wrap = |e: Error| Error::bad_file(dir, format!("incomplete device bundle: {e}"));
        // Greedy decoding screens the head with an 8-bit copy (same tokens, a quarter of the
        // bytes read per row; `run-edge --greedy-head full` drops it).
        let mut head = Head::load(&vb, cfg).map_err(wrap)?;
        head.set_screen(device.is_cpu())?;
        Ok(Self {
            embedder: Embedder::load(&vb, cfg).map_err(wrap)?,
            input: LayerStack::load(&vb, cfg, m.plan.input_range(), rope.clone()).map_err(wrap)?,
            output: LayerStack::load(&vb, cfg, m.plan.output_range(), rope.clone()).map_err(wrap)?,
            head,
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
    /// Loads the bundle to compute in [`default_compute_dtype`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, None)
    }

    /// Loads the bundle to compute in `dtype` (`None`: [`default_compute_dtype`]). Blocks
    /// arrive as f32 and go back in the wire's dtype whatever it is; only f32 on the CPU
    /// computes every row bitwise as the unsplit model does.
    pub fn load_as(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let m = read_manifest(dir, Role::Cloud)?;
        let dtype = match dtype {
            Some(d) => d,
            None => default_compute_dtype(&m, device)?,
        };
        let vb = bundle_vb(dir, &m, device, dtype)?;
        let rope = Arc::new(Rope::new(&m.config, vb.dtype(), device)?);
        let middle = LayerStack::load(&vb, &m.config, m.plan.middle_range(), rope)
            .map_err(|e| Error::bad_file(dir, format!("incomplete cloud bundle: {e}")))?;
        Ok(Self { manifest: m, middle })
    }
}
