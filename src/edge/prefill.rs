//! Chunked prefill: each chunk of the prompt goes up as soon as its input hidden states exist,
//! replies run through the output submodel as they arrive, and the draft path's own prefill
//! overlaps with the cloud's work on the last chunks.

use candle_core::{DType, Device, Tensor};

use crate::edge::state::Edge;
use crate::error::{Error, Result};
use crate::net::{MiddleLink, MiddleReply};

impl<L: MiddleLink> Edge<'_, L> {
    /// Chunked prefill: each chunk goes up as soon as its input hidden states exist; replies
    /// are run through the output submodel as they arrive. Returns the last position's logits.
    pub(super) fn prefill(&mut self, prompt: &[u32], chunk: usize, drafting: bool) -> Result<Tensor> {
        let chunk = if chunk == 0 { prompt.len() } else { chunk };
        let mut pending = 0usize;
        let mut last = None;
        if drafting && self.adapter.is_conditioned() {
            self.features = Some(Tensor::zeros((1, 1, self.dev.manifest.hidden_size), DType::F32, &Device::Cpu)?);
        }
        let mut handle = |edge: &mut Self, r: MiddleReply| -> Result<()> {
            let is_last = r.start + r.hidden.dim(1)? == prompt.len();
            if drafting {
                edge.push_features(&r.hidden)?;
            }
            let logits = edge.llm_logits(&r, false)?;
            if is_last {
                last = Some(logits.squeeze(0)?);
            }
            Ok(())
        };
        for ids in prompt.chunks(chunk) {
            let pos = self.input.len();
            let h = self.input_hidden(ids)?;
            self.link.submit(pos, &h)?;
            pending += 1;
            if drafting {
                self.push_tail(&h)?;
            }
            while let Some(r) = self.link.try_receive()? {
                self.cloud_time += r.cloud_compute;
                pending -= 1;
                handle(self, r)?;
            }
        }
        // The draft path's prefill overlaps with the cloud's work on the last chunks (for a
        // conditioned adapter, chunk by chunk as the middle outputs it needs arrive).
        if drafting {
            self.run_draft_path(false)?;
        }
        for _ in 0..pending {
            let r = self.receive()?;
            handle(self, r)?;
            if drafting {
                self.run_draft_path(false)?;
            }
        }
        last.ok_or_else(|| Error::invalid("the cloud never answered the last prompt chunk"))
    }

}
