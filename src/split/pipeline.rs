//! The split run in one process: device input submodel → cloud middle submodel → device output
//! submodel, each over its own cache. The reference for what a split must compute
//! ([`LocalSplitDecoder`]) and the teacher's pass in adapter training.

use candle_core::Tensor;

use crate::decode::Decoder;
use crate::error::{Error, Result};
use crate::model::StackCache;
use crate::split::bundle::{CloudBundle, DeviceBundle};

/// The hidden states one pass of the pipeline produced, each `(batch, seq, hidden)`.
#[derive(Debug, Clone)]
pub struct PipelineStates {
    /// The input submodel's output (what the device sends up).
    pub input: Tensor,
    /// The middle layers' output (what the cloud sends down).
    pub middle: Tensor,
    /// The output submodel's output (before the final norm and head).
    pub output: Tensor,
}

/// Input → middle → output over three caches that always hold the same positions.
#[derive(Debug)]
pub struct SplitPipeline<'a> {
    pub device: &'a DeviceBundle,
    pub cloud: &'a CloudBundle,
    caches: [StackCache; 3],
}

impl<'a> SplitPipeline<'a> {
    /// A pipeline over the two halves of one split (refused when their split ids differ).
    pub fn new(device: &'a DeviceBundle, cloud: &'a CloudBundle) -> Result<Self> {
        if device.manifest.split_id != cloud.manifest.split_id {
            return Err(Error::invalid(format!(
                "device bundle (split {}) and cloud bundle (split {}) come from different splits",
                device.manifest.split_id, cloud.manifest.split_id
            )));
        }
        let caches = [device.input.new_cache(), cloud.middle.new_cache(), device.output.new_cache()];
        Ok(Self { device, cloud, caches })
    }

    /// Runs embeddings `x`, `(batch, seq, hidden)`, at positions `position()..position() + seq`
    /// through the three stages.
    pub fn forward(&mut self, x: &Tensor) -> Result<PipelineStates> {
        let pos = self.position();
        let [ci, cm, co] = &mut self.caches;
        let input = self.device.input.forward(x, pos, ci)?;
        let middle = self.cloud.middle.forward(&input, pos, cm)?;
        let output = self.device.output.forward(&middle, pos, co)?;
        Ok(PipelineStates { input, middle, output })
    }

    /// Positions held.
    pub fn position(&self) -> usize {
        self.caches[0].len()
    }

    /// Forgets every position.
    pub fn reset(&mut self) {
        self.caches.iter_mut().for_each(StackCache::clear);
    }
}

/// [`SplitPipeline`] as a [`Decoder`] on token ids: what `hat generate` computes, cut in three.
#[derive(Debug)]
pub struct LocalSplitDecoder<'a> {
    pipeline: SplitPipeline<'a>,
}

impl<'a> LocalSplitDecoder<'a> {
    pub fn new(device: &'a DeviceBundle, cloud: &'a CloudBundle) -> Result<Self> {
        Ok(Self { pipeline: SplitPipeline::new(device, cloud)? })
    }

    /// Logits at every fed position, `(seq, vocab)`.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<Tensor> {
        let device = self.pipeline.device;
        let states = self.pipeline.forward(&device.embedder.embed_ids(ids)?)?;
        Ok(device.head.forward(&states.output)?.squeeze(0)?)
    }
}

impl Decoder for LocalSplitDecoder<'_> {
    fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        let logits = self.feed_all(ids)?;
        Ok(logits.get(logits.dim(0)? - 1)?)
    }
    fn position(&self) -> usize {
        self.pipeline.position()
    }
    fn max_positions(&self) -> usize {
        self.pipeline.device.input.max_positions()
    }
    fn reset(&mut self) {
        self.pipeline.reset();
    }
}
