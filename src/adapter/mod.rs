//! The draft adapter: a few decoder layers at the model's hidden size that stand in for the
//! cloud's middle layers on the device (input submodel → adapter → output submodel = the SLM).
//!
//! Two kinds:
//! - **unconditioned**: the layers run on the input submodel's hidden states `h_in[t]` alone and
//!   must stand in for the whole middle (layer skipping);
//! - **feature-conditioned** (EAGLE-style): the layers' input at position t is
//!   `fuse · [rms(m[t-1]) ; h_in[t]]`, where `m[t-1]` is the middle layers' output at the previous
//!   position. The device holds `m` for every verified position anyway (it runs the output
//!   submodel on it), so conditioning costs no extra traffic and reveals nothing new; for drafted
//!   positions the adapter's own prediction stands in. The adapter's output at t predicts `m[t]`.
//!
//! What the SLM's output submodel attends to at earlier positions ([`DraftContext`]) is part of
//! an adapter too: it is trained for one of the two.
//!
//!
//! [`file`](mod@file) holds the file format: one place saves and loads adapters (and resolves `--adapter
//! auto` to the one shipped for a split).
//!
//! May use [`crate::model`], [`crate::split`] (manifests) and [`crate::util`]; never a role.

pub mod file;
pub mod head;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{DecoderLayer, LayerStack, Rope, StackCache, Truth};
use crate::split::Manifest;

pub use file::{default_adapter_path, load_choice, DraftVocab, Storage, StoredAdapter, FORMAT, FUSE};
pub use head::DraftHead;

/// What the SLM's output submodel attends to at the positions before the one it drafts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftContext {
    /// Its own states, computed over the adapter's predicted middle outputs: the SLM is a model
    /// of its own, with an output-submodel cache of its own.
    #[default]
    Drafted,
    /// The LLM's output-submodel states over the cloud's middle outputs (exact) for every
    /// verified position, and the drafts of the current round: the device computes those states
    /// anyway to verify, so the SLM only adds the drafted positions.
    Verified,
}

impl DraftContext {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "drafted" => Ok(Self::Drafted),
            "verified" => Ok(Self::Verified),
            _ => Err(Error::invalid(format!("unknown draft context '{s}' (this hat knows drafted and verified)"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drafted => "drafted",
            Self::Verified => "verified",
        }
    }
}

/// A loaded adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Conditioned adapters: `(hidden, 2·hidden)`, maps `[rms(m[t-1]) ; h_in[t]]` to the layers'
    /// input (`rms`: scaled to unit root mean square per position, without weights; position 0,
    /// an attention sink, has ~40× the norm of the others).
    pub fuse: Option<Tensor>,
    pub layers: LayerStack,
    pub draft_context: DraftContext,
    /// The draft vocabulary stored with it, if any ([`DraftHead`]).
    pub draft_vocab: Option<DraftVocab>,
    /// The split it belongs to; `None` for the untrained default.
    pub split_id: Option<String>,
    pub metadata: HashMap<String, String>,
}

impl Adapter {
    /// The untrained default: no layers, the SLM runs the output submodel straight on the input
    /// submodel's hidden states (it "skips the middle"). Lossless, only fewer drafts accepted.
    pub fn none(rope: Arc<Rope>) -> Self {
        Self {
            fuse: None,
            layers: LayerStack::from_layers(0..0, Vec::new(), rope),
            draft_context: DraftContext::Drafted,
            draft_vocab: None,
            split_id: None,
            metadata: HashMap::new(),
        }
    }

    /// An adapter of `n` layers over f32 `tensors` named as in the file (`adapter.layers.{i}.*`,
    /// and [`FUSE`] when `conditioned`), in the [`DraftContext::Drafted`] context and without a
    /// split id or metadata.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, n: usize, conditioned: bool, manifest: &Manifest, rope: Arc<Rope>, device: &Device) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let hidden = manifest.config.hidden_size;
        let fuse = if conditioned {
            Some(vb.get((hidden, 2 * hidden), FUSE).map_err(|e| Error::invalid(format!("conditioned adapter without a fitting {FUSE}: {e}")))?)
        } else {
            None
        };
        let vb = vb.pp("adapter.layers");
        let layers = (0..n)
            .map(|i| DecoderLayer::load(vb.pp(i), &manifest.config))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::invalid(format!("adapter tensors do not fit the model: {e}")))?;
        Ok(Self { fuse, layers: LayerStack::from_layers(0..n, layers, rope), draft_context: DraftContext::Drafted, draft_vocab: None, split_id: None, metadata: HashMap::new() })
    }

    /// Whether the adapter reads the previous position's middle output (EAGLE-style).
    pub fn is_conditioned(&self) -> bool {
        self.fuse.is_some()
    }

    /// Runs the adapter on `h_in`, `(batch, n, hidden)`, the input submodel's hidden states of
    /// positions `pos..pos + n`. Conditioned adapters also take `prev`, `(batch, n, hidden)`: the
    /// middle output at positions `pos - 1..pos + n - 1` (zeros before position 0). Returns the
    /// predicted middle output `(batch, n, hidden)`.
    pub fn forward(&self, h_in: &Tensor, prev: Option<&Tensor>, pos: usize, cache: &mut StackCache) -> Result<Tensor> {
        self.layers.forward(&self.layer_input(h_in, prev)?, pos, cache)
    }

    /// [`Adapter::forward`] for rows of a draft tree appended to `cache` (`prev`: the middle
    /// output, predicted, of each row's parent), attending as `mask` says.
    pub fn forward_tree(&self, h_in: &Tensor, prev: Option<&Tensor>, cache: &mut StackCache, mask: Arc<crate::model::tree::TreeMask>) -> Result<Tensor> {
        self.layers.forward_tree(&self.layer_input(h_in, prev)?, cache, mask)
    }

    /// The layers' input: `h_in`, or for conditioned adapters `fuse · [rms(prev) ; h_in]`.
    fn layer_input(&self, h_in: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        Ok(match (&self.fuse, prev) {
            (None, _) => h_in.clone(),
            (Some(fuse), Some(prev)) => Tensor::cat(&[&rms_normalise(prev)?, h_in], 2)?.broadcast_matmul(&fuse.t()?)?,
            (Some(_), None) => return Err(Error::invalid("a conditioned adapter needs the previous positions' middle output")),
        })
    }

    /// Teacher-forced run from position 0 over a whole sequence: `h_in` and `middle` (the middle
    /// layers' output at the same positions, required when conditioned) are `(batch, len,
    /// hidden)`; each position is conditioned on the previous position's middle output.
    pub fn forward_teacher_forced(&self, h_in: &Tensor, middle: Option<&Tensor>) -> Result<Tensor> {
        let prev = match (self.is_conditioned(), middle) {
            (true, Some(m)) => Some(shift_right(m)?),
            _ => None,
        };
        self.forward(h_in, prev.as_ref(), 0, &mut self.layers.new_cache())
    }

    /// Teacher-forced draft path from position 0 up to the output submodel: `h_in` and `middle`
    /// (the middle layers' true output at the same positions; required when conditioned or when
    /// the draft context is `verified`) are `(batch, len, hidden)`. Every position runs as the
    /// first draft of a round runs: behind verified positions. Returns the output submodel's
    /// hidden states (the head turns them into the drafts' logits) and the adapter's predicted
    /// middle outputs, both `(batch, len, hidden)`.
    pub fn draft_hidden(&self, output: &LayerStack, h_in: &Tensor, middle: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        self.draft_hidden_with(output, h_in, middle, None)
    }

    /// [`Adapter::draft_hidden`], with the output submodel's keys and values over `middle` given
    /// when they are already known (training computes them once per sequence).
    pub fn draft_hidden_with(&self, output: &LayerStack, h_in: &Tensor, middle: Option<&Tensor>, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<(Tensor, Tensor)> {
        let predicted = self.forward_teacher_forced(h_in, middle)?;
        Ok((self.output_hidden(output, &predicted, middle, output_kv)?, predicted))
    }

    /// The next draft of a round, teacher-forced like [`Adapter::draft_hidden`] (conditioned
    /// adapters): position t reads `drafted[t-1]`, the previous draft step's prediction of the
    /// middle output at t-1, where the first draft read the true one; like at run time it attends
    /// to the adapter states of earlier positions made from true middle outputs. (The output
    /// submodel's context is taken as verified at every earlier position, though at run time the
    /// previous position's state is a draft's.) Returns the output submodel's hidden states and
    /// the new predictions, `(batch, len, hidden)`.
    pub fn next_draft_hidden(&self, output: &LayerStack, h_in: &Tensor, middle: &Tensor, drafted: &Tensor, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<(Tensor, Tensor)> {
        if !self.is_conditioned() {
            return Err(Error::invalid("only a conditioned adapter reads its own drafts"));
        }
        let truth = self.layer_input(h_in, Some(&shift_right(middle)?))?;
        let from_drafts = self.layer_input(h_in, Some(&shift_right(drafted)?))?;
        let predicted = self.layers.forward_beside(&from_drafts, Truth::States(&truth))?;
        Ok((self.output_hidden(output, &predicted, Some(middle), output_kv)?, predicted))
    }

    /// The output submodel over predicted middle outputs `(batch, len, hidden)` from position 0,
    /// in this adapter's draft context (behind verified positions: the true `middle` outputs, or
    /// the output submodel's keys and values over them when given).
    fn output_hidden(&self, output: &LayerStack, predicted: &Tensor, middle: Option<&Tensor>, output_kv: Option<&[(Tensor, Tensor)]>) -> Result<Tensor> {
        match (self.draft_context, output_kv, middle) {
            (DraftContext::Drafted, _, _) => output.forward(predicted, 0, &mut output.new_cache()),
            (DraftContext::Verified, Some(kv), _) => output.forward_beside(predicted, Truth::KeysValues(kv)),
            (DraftContext::Verified, None, Some(m)) => output.forward_beside(predicted, Truth::States(m)),
            (DraftContext::Verified, None, None) => Err(Error::invalid("internal: drafts behind verified positions need the true middle outputs")),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.num_layers()
    }
}

/// `(batch, len, hidden)` shifted one position later along `len`, zeros first: row t holds
/// row t-1.
fn shift_right(m: &Tensor) -> Result<Tensor> {
    let (b, n, h) = m.dims3()?;
    let zeros = Tensor::zeros((b, 1, h), m.dtype(), m.device())?;
    Ok(Tensor::cat(&[&zeros, &m.narrow(1, 0, n - 1)?], 1)?)
}

/// `x / sqrt(mean(x²) + ε)` over the last dimension, with differentiable ops.
fn rms_normalise(x: &Tensor) -> Result<Tensor> {
    let ms = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + 1e-6)?;
    Ok(x.broadcast_div(&ms.sqrt()?)?)
}
