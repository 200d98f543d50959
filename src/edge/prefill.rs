//! Chunked prefill: each chunk of the prompt goes up as soon as its input hidden states exist,
//! replies run through the output submodel as they arrive (the head only on the last position),
//! and the draft path's own prefill runs, a slice at a time, while the cloud works on the chunks
//! still out; what is left of it runs after the first token (in a catch-up round when it is
//! much, `--draft-catch-up`).

use candle_core::{DType, Device, Tensor};

use crate::edge::state::{Edge, Logits};
use crate::error::{Error, Result};
use crate::net::{MiddleLink, MiddleReply};

/// Prompt positions the draft path catches up at a time while prefill replies are out (about
/// 5 ms of the shipped 4-layer adapter on one core: what a reply may wait for).
const CATCH_UP_SLICE: usize = 8;

impl<L: MiddleLink> Edge<'_, L> {
    /// Chunked prefill: each chunk (`chunks`: lengths summing to the prompt's) goes up as soon
    /// as its input hidden states exist; replies are run through the output submodel as they
    /// arrive. Returns the last position's logits.
    pub(super) fn prefill(&mut self, prompt: &[u32], chunks: &[usize], drafting: bool) -> Result<Tensor> {
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
            // The head runs on the prompt's last position only.
            let logits = edge.llm_logits(&r, if is_last { Logits::Last } else { Logits::None })?;
            if let (true, Some(l)) = (is_last, logits) {
                last = Some(l.squeeze(0)?);
            }
            Ok(())
        };
        let mut from = 0;
        for &len in chunks {
            let ids = &prompt[from..from + len];
            from += len;
            let pos = self.input.len();
            let h = self.input_hidden(ids)?;
            self.link.submit(pos, &h)?;
            pending += 1;
            if drafting {
                self.push_tail(&h)?;
            }
            while self.reply_arrived()? {
                let r = self.receive()?;
                pending -= 1;
                handle(self, r)?;
            }
        }
        // The draft path's prefill overlaps with the cloud's work on the chunks still out (for
        // a conditioned adapter, chunk by chunk as the middle outputs it needs arrive): what can
        // run now, then a few positions at a time while a reply other than the last is out, so
        // that the last one (the first token) never waits for a slice; what is left runs after
        // the first token (a catch-up round when it is much).
        if drafting {
            self.run_draft_path(false)?;
        }
        while pending > 0 {
            // A reply already in goes first; otherwise a slice, or the wait.
            if drafting && pending > 1 && !self.reply_arrived()? && self.catch_up_draft_path(CATCH_UP_SLICE)? {
                continue;
            }
            let r = self.receive()?;
            pending -= 1;
            handle(self, r)?;
        }
        self.prefill_draft_rows = self.adapter_cache.len();
        last.ok_or_else(|| Error::invalid("the cloud never answered the last prompt chunk"))
    }

}
