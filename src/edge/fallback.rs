//! Finishing an answer on the device alone when no cloud can be reached (`--fallback slm`):
//! the SLM (input submodel → adapter → output submodel → full head) as a [`Decoder`]. Its
//! tokens are the draft model's, not the LLM's: the report says from which token on.

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use crate::adapter::Adapter;
use crate::decode::Decoder;
use crate::error::Result;
use crate::model::StackCache;
use crate::split::DeviceBundle;

/// What the edge does when the cloud is lost for good mid-answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Fail, with the text generated so far kept by the caller.
    #[default]
    None,
    /// Finish the answer with the on-device SLM alone, and say which tokens it made.
    Slm,
}

impl Fallback {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "slm" => Ok(Self::Slm),
            other => Err(crate::error::Error::invalid(format!("fallback `{other}`: expected `none` or `slm`"))),
        }
    }
}

/// The on-device SLM alone, with caches of its own. A conditioned adapter reads its own
/// prediction of the previous position's middle output (there is no cloud to give the true one),
/// so positions go through it one at a time.
pub struct SlmDecoder<'a> {
    dev: &'a DeviceBundle,
    adapter: &'a Adapter,
    input: StackCache,
    adapter_cache: StackCache,
    output: StackCache,
    /// The adapter's predicted middle output at the last position, `(1, 1, hidden)`.
    last_middle: Option<Tensor>,
}

impl<'a> SlmDecoder<'a> {
    pub fn new(dev: &'a DeviceBundle, adapter: &'a Adapter) -> Self {
        Self { dev, adapter, input: dev.input.new_cache(), adapter_cache: adapter.layers.new_cache(), output: dev.output.new_cache(), last_middle: None }
    }

    /// The adapter over the input submodel's states `h_in`, `(1, n, hidden)`, of positions
    /// `pos..pos + n`: its predicted middle outputs, `(1, n, hidden)`.
    fn middle(&mut self, h_in: &Tensor, pos: usize) -> Result<Tensor> {
        if !self.adapter.is_conditioned() {
            return self.adapter.forward(h_in, None, pos, &mut self.adapter_cache);
        }
        let n = h_in.dim(1)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let prev = match &self.last_middle {
                Some(m) => m.clone(),
                None => Tensor::zeros((1, 1, h_in.dim(2)?), DType::F32, h_in.device())?,
            };
            let m = self.adapter.forward(&h_in.i((.., i..i + 1, ..))?, Some(&prev), pos + i, &mut self.adapter_cache)?;
            self.last_middle = Some(m.clone());
            out.push(m);
        }
        Ok(Tensor::cat(&out, 1)?)
    }
}

impl Decoder for SlmDecoder<'_> {
    fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        let pos = self.input.len();
        let x = self.dev.embedder.embed_ids(ids)?;
        let h_in = self.dev.input.forward(&x, pos, &mut self.input)?;
        let m = self.middle(&h_in, pos)?;
        let h = self.dev.output.forward(&m, pos, &mut self.output)?;
        Ok(self.dev.head.forward_last(&h)?.squeeze(0)?)
    }

    fn position(&self) -> usize {
        self.input.len()
    }

    fn max_positions(&self) -> usize {
        self.dev.input.max_positions()
    }

    fn reset(&mut self) {
        self.input.clear();
        self.adapter_cache.clear();
        self.output.clear();
        self.last_middle = None;
    }
}
