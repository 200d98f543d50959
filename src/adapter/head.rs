//! The draft head: the SLM's LM head while it drafts. It scores only a reduced draft vocabulary
//! (the N most frequent tokens of the adapter's training data, stored in the adapter file; as
//! FR-Spec and EAGLE-3 do), optionally from 8-bit rows. Verification always uses the model's full
//! f32 head, so a draft outside the reduced vocabulary is never produced but the output stays
//! exact; only how many drafts are accepted changes.
//!
//! A generation may add the tokens of its own text (the prompt and the answer so far) that the
//! reduced vocabulary lacks ([`DraftHead::add_context`]): names, identifiers and rare words are
//! what an answer repeats, and a draft can only propose a row it scores.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::ops::project;
use crate::model::{Head, Ops, Proj};

/// Most rows a generation's own tokens add to a reduced draft head.
pub const MAX_CONTEXT_ROWS: usize = 1024;

/// Rows of the head scored while drafting: `(n, hidden)`, and the token id of each; then the
/// rows a generation added from its own text, if any.
#[derive(Debug, Clone)]
pub struct DraftHead {
    /// Token id of each row; `None`: the whole vocabulary in id order.
    ids: Option<Vec<u32>>,
    rows: Proj,
    vocab: usize,
    int8: bool,
    /// Rows added from the generation's text ([`Self::add_context`]): their token ids and
    /// rows `(extra, hidden)`, scored after `rows`.
    extra_ids: Vec<u32>,
    extra_rows: Option<Proj>,
    /// Whether each vocabulary token has a row (empty for the full head).
    scored: Vec<bool>,
}

impl DraftHead {
    /// The draft head over `head`'s rows `ids` (`None`: all of them); `int8`: computed from
    /// row-scaled 8-bit copies of those rows.
    pub fn new(head: &Head, ids: Option<&[u32]>, int8: bool) -> Result<Self> {
        let w = head.weight();
        let vocab = w.dim(0)?;
        let rows = match ids {
            None => w.clone(),
            Some(ids) => {
                if ids.is_empty() {
                    return Err(Error::invalid("an empty draft vocabulary"));
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Error::invalid(format!("draft vocabulary token {bad} is outside the model's vocabulary of {vocab}")));
                }
                w.index_select(&Tensor::new(ids, w.device())?, 0)?
            }
        };
        let rows: Proj = candle_nn::Linear::new(rows, None).into();
        let rows = if int8 { rows.with_q8()? } else { rows };
        let mut scored = vec![false; if ids.is_some() { vocab } else { 0 }];
        for &t in ids.unwrap_or_default() {
            scored[t as usize] = true;
        }
        Ok(Self { ids: ids.map(<[u32]>::to_vec), rows, vocab, int8, extra_ids: Vec::new(), extra_rows: None, scored })
    }

    /// Adds rows for the tokens of `tokens` (a generation's text) that a reduced head does not
    /// score yet, up to [`MAX_CONTEXT_ROWS`] added in all; rows only ever append, so a row index
    /// keeps its token. Returns how many were added (none for the full head).
    pub fn add_context(&mut self, head: &Head, tokens: &[u32]) -> Result<usize> {
        if self.ids.is_none() {
            return Ok(0);
        }
        let before = self.extra_ids.len();
        for &t in tokens {
            if self.extra_ids.len() >= MAX_CONTEXT_ROWS {
                break;
            }
            if let Some(seen @ false) = self.scored.get_mut(t as usize) {
                *seen = true;
                self.extra_ids.push(t);
            }
        }
        let added = self.extra_ids.len() - before;
        if added > 0 {
            let w = head.weight();
            let rows: Proj = candle_nn::Linear::new(w.index_select(&Tensor::new(self.extra_ids.as_slice(), w.device())?, 0)?, None).into();
            self.extra_rows = Some(if self.int8 { rows.with_q8()? } else { rows });
        }
        Ok(added)
    }

    /// Rows a generation added from its text ([`Self::add_context`]).
    pub fn context_rows(&self) -> usize {
        self.extra_ids.len()
    }

    /// Rows scored per draft step.
    pub fn len(&self) -> usize {
        self.ids.as_ref().map_or(self.vocab, Vec::len) + self.extra_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it scores the whole vocabulary.
    pub fn is_full(&self) -> bool {
        self.ids.is_none()
    }

    /// Draft logits of the last position of `y`, the output submodel's states `(1, seq,
    /// hidden)`: `(len,)`, one per row.
    pub fn logits(&self, head: &Head, y: &Tensor) -> Result<Tensor> {
        let seq = y.dim(1)?;
        let last = head.norm(&y.narrow(1, seq - 1, 1)?)?;
        Ok(self.score(&last, false)?.flatten_all()?)
    }

    /// Draft logits at every position of `y`, `(1, seq, hidden)`: `(seq, len)`.
    pub fn logits_all(&self, head: &Head, y: &Tensor) -> Result<Tensor> {
        Ok(self.score(&head.norm(y)?, true)?.squeeze(0)?)
    }

    /// Every row's score of the normed states `(1, seq, hidden)`: `(1, seq, len)`, the added
    /// rows last.
    fn score(&self, normed: &Tensor, exact: bool) -> Result<Tensor> {
        let logits = project(&self.rows, normed, Ops::Fused, exact)?;
        match &self.extra_rows {
            None => Ok(logits),
            Some(extra) => Ok(Tensor::cat(&[logits, project(extra, normed, Ops::Fused, exact)?], 2)?),
        }
    }

    /// The token id of row `row`.
    pub fn token(&self, row: u32) -> u32 {
        match &self.ids {
            Some(ids) => match ids.get(row as usize) {
                Some(&id) => id,
                None => self.extra_ids.get(row as usize - ids.len()).copied().unwrap_or(row),
            },
            None => row,
        }
    }

    /// A distribution over the rows as one over the whole vocabulary (zero outside the rows).
    pub fn to_vocab(&self, q: Vec<f32>) -> Vec<f32> {
        match &self.ids {
            None => q,
            Some(ids) => {
                let mut full = vec![0f32; self.vocab];
                for (&id, p) in ids.iter().chain(&self.extra_ids).zip(q) {
                    full[id as usize] = p;
                }
                full
            }
        }
    }
}

/// Tokens ordered by how often they occur in `sequences`, most frequent first (ties: lower id
/// first); tokens never seen are left out.
pub fn by_frequency<'a>(sequences: impl IntoIterator<Item = &'a [u32]>) -> Vec<u32> {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for s in sequences {
        for &t in s {
            *counts.entry(t).or_default() += 1;
        }
    }
    let mut ids: Vec<(u32, u64)> = counts.into_iter().collect();
    ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ids.into_iter().map(|(t, _)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_order_and_scatter() -> Result<()> {
        let seqs: Vec<Vec<u32>> = vec![vec![5, 3, 5, 7], vec![3, 5, 9]];
        assert_eq!(by_frequency(seqs.iter().map(Vec::as_slice)), [5, 3, 7, 9]);

        let dev = candle_core::Device::Cpu;
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::path::Path::new("tempdir"), e))?;
        crate::testing::tiny_model(dir.path(), crate::testing::TinySpec::default())?;
        let loaded = crate::io::source::LoadedModel::load(&crate::io::source::ModelSpec::HfDir(dir.path().to_path_buf()))?;
        let model = loaded.model(candle_core::DType::F32, &dev)?;
        let y = Tensor::randn(0f32, 1.0, (1, 3, loaded.config.hidden_size), &dev)?;
        let full = model.head.forward_last(&y)?.flatten_all()?.to_vec1::<f32>()?;
        // The full draft head is the model's head; a reduced one scores exactly its rows.
        let all = DraftHead::new(&model.head, None, false)?;
        assert_eq!(all.logits(&model.head, &y)?.to_vec1::<f32>()?, full);
        let ids = [4u32, 0, 9];
        let some = DraftHead::new(&model.head, Some(&ids), false)?;
        let got = some.logits(&model.head, &y)?.to_vec1::<f32>()?;
        for (i, &id) in ids.iter().enumerate() {
            assert!((got[i] - full[id as usize]).abs() < 1e-5);
            assert_eq!(some.token(i as u32), id);
        }
        // Int8 rows: each logit within half a quantisation step per weight, times the normed
        // input's L1 norm (the bound of row-scaled rounding).
        let q8 = DraftHead::new(&model.head, Some(&ids), true)?.logits(&model.head, &y)?.to_vec1::<f32>()?;
        let l1 = model.head.norm(&y.narrow(1, 2, 1)?)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        for ((a, b), &id) in q8.iter().zip(&got).zip(&ids) {
            let step = model.head.weight().get(id as usize)?.abs()?.max(0)?.to_scalar::<f32>()? / 127.0;
            assert!((a - b).abs() <= 0.5 * step * l1 + 1e-4, "int8 logit {a} vs {b}");
        }
        // A generation's own tokens: those without a row are added after the rows, once each;
        // a token outside the vocabulary is ignored; the full head adds nothing.
        let mut grown = some.clone();
        assert_eq!(grown.add_context(&model.head, &[9, 5, 5, 7, 100_000])?, 2);
        assert_eq!(grown.add_context(&model.head, &[5, 4])?, 0);
        assert_eq!((grown.len(), grown.context_rows(), grown.token(3), grown.token(4)), (5, 2, 5, 7));
        let logits = grown.logits(&model.head, &y)?.to_vec1::<f32>()?;
        let every = grown.logits_all(&model.head, &y)?;
        assert_eq!(every.dims(), [3, 5]);
        assert_eq!(every.get(2)?.to_vec1::<f32>()?, logits);
        for (row, &id) in [4u32, 0, 9, 5, 7].iter().enumerate() {
            assert!((logits[row] - full[id as usize]).abs() < 1e-5);
        }
        let q = grown.to_vocab(vec![0.1, 0.2, 0.3, 0.15, 0.25]);
        assert_eq!((q[4], q[0], q[9], q[5], q[7]), (0.1, 0.2, 0.3, 0.15, 0.25));
        assert_eq!(all.clone().add_context(&model.head, &[5, 7])?, 0);
        let mut grown8 = DraftHead::new(&model.head, Some(&ids), true)?;
        grown8.add_context(&model.head, &[5])?;
        assert_eq!(grown8.logits(&model.head, &y)?.dims(), [4]);
        let q = some.to_vocab(vec![0.5, 0.25, 0.25]);
        assert_eq!(q.len(), full.len());
        assert_eq!((q[4], q[0], q[9], q[1]), (0.5, 0.25, 0.25, 0.0));
        assert!(DraftHead::new(&model.head, Some(&[u32::MAX]), false).is_err());
        assert!(DraftHead::new(&model.head, Some(&[]), false).is_err());
        Ok(())
    }
}
