//! The splittable Llama-family engine.
//!
//! A model is three kinds of pieces, each loaded on its own from a [`VarBuilder`] whose tree
//! mirrors the checkpoint's tensor names (`model.embed_tokens`, `model.layers.{i}`, `model.norm`,
//! `lm_head`):
//! - [`Embedder`]: token ids `(batch, seq)` → hidden states `(batch, seq, hidden)`;
//! - [`LayerStack`]: any range `[a, b)` of decoder layers, hidden → hidden, with its own
//!   [`StackCache`] that takes blocks of several positions and truncates back (rollback);
//! - [`Head`]: final norm + LM head, hidden `(batch, seq, hidden)` → logits `(batch, seq, vocab)`.
//!
//! [`Model`] chains them for the unsplit reference. Compute is f32 on CPU; weights may be stored
//! in f16/bf16 and are converted when loaded. [`Ops::Differentiable`] swaps candle-nn's fused
//! kernels (rms_norm, rope, softmax_last_dim: no backward) for compositions that have gradients.
//!
//! Files: [`config`] (checkpoint configs and the runtime [`ModelConfig`]), [`rope`], [`ops`]
//! (norms, softmax, projections), [`layer`] ([`DecoderLayer`], attention masks), [`stack`]
//! ([`LayerStack`], [`StackCache`]), [`cache`] (the truncatable KV cache), [`ends`]
//! ([`Embedder`], [`Head`]), [`kernels`] (fused CPU kernels), [`q4`] (f32 matrices that are exactly
//! 4-bit affine blocks, as the GGUF's Q4_1 decodes, held and multiplied as those blocks with the
//! f32 kernel's bits), [`q8`] (row-scaled 8-bit matrices
//! and their small-m matmul, for draft compute), [`screen`] (the head's greedy argmax screened by
//! an 8-bit copy, exact), [`tree`] (draft trees: shapes, masks, keeping a
//! path, the cache of a session whose blocks may be trees); [`rotate`] (a stack in a rotated
//! basis: the obfuscation `hat audit` shows to fail); [`beside`]: the training-only pass of
//! a drafted stream beside the true one.
//!
//! The bottom of the library: uses only [`crate::util`] and the error type.

pub mod beside;
pub mod cache;
pub mod config;
pub mod ends;
pub mod kernels;
pub mod layer;
pub mod ops;
pub mod q4;
pub mod q8;
pub mod rope;
pub mod rotate;
pub mod screen;
pub mod stack;
pub mod tree;

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

pub use beside::Truth;
pub use config::ModelConfig;
pub use ends::{Embedder, Head};
pub use layer::{AttentionMask, DecoderLayer};
pub use ops::{Ops, Proj};
pub use q8::Q8Matrix;
pub use rope::{Rope, MAX_CONTEXT};
pub use stack::{packable, LayerStack, PackedBlock, StackCache};

use crate::error::Result;

/// The whole, unsplit model: the reference every split and speculative path must reproduce.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embedder: Embedder,
    pub layers: LayerStack,
    pub head: Head,
}

impl Model {
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let rope = Arc::new(Rope::new(cfg, vb.dtype(), vb.device())?);
        Ok(Self {
            config: cfg.clone(),
            embedder: Embedder::load(vb, cfg)?,
            layers: LayerStack::load(vb, cfg, 0..cfg.num_hidden_layers, rope)?,
            head: Head::load(vb, cfg)?,
        })
    }

    pub fn new_cache(&self) -> StackCache {
        self.layers.new_cache()
    }

    /// Feeds `ids` at positions `cache.len()..` and returns the logits of the last one, `(vocab,)`.
    pub fn forward_last(&self, ids: &[u32], cache: &mut StackCache) -> Result<Tensor> {
        let x = self.embedder.embed_ids(ids)?;
        let x = self.layers.forward(&x, cache.len(), cache)?;
        Ok(self.head.forward_last(&x)?.squeeze(0)?)
    }

    /// Feeds `ids` at positions `cache.len()..` and returns the logits at every one, `(seq, vocab)`.
    pub fn forward_all(&self, ids: &[u32], cache: &mut StackCache) -> Result<Tensor> {
        let x = self.embedder.embed_ids(ids)?;
        let x = self.layers.forward(&x, cache.len(), cache)?;
        Ok(self.head.forward(&x)?.squeeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::config::Family;
    use crate::io::source::{LoadedModel, ModelSpec};
    use crate::testing::{tiny_model, TinySpec};

    fn load(spec: TinySpec) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), spec).unwrap();
        let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
        let model = loaded.model(DType::F32, &Device::Cpu).unwrap();
        (dir, model)
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// max |a - b| relative to max |b|.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6)
    }

    const IDS: [u32; 40] = [
        72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 1, 2, 3, 200, 201, 202, 50, 60, 70, 80, 90, 100, 110,
        120, 130, 140, 150, 160, 170, 180, 190, 5, 6, 7, 8, 9, 255,
    ];

    /// The logits of every position, fed all at once (matmul attention path: 40 * 2 rows > 64).
    fn reference(model: &Model) -> Tensor {
        model.forward_all(&IDS, &mut model.new_cache()).unwrap()
    }

    #[test]
    fn incremental_and_block_decoding_match_the_full_pass() {
        for spec in [
            TinySpec::default(),
            TinySpec { family: Family::Qwen2, kv_heads: 4, tie_embeddings: false, ..TinySpec::default() },
            TinySpec { kv_heads: 1, ..TinySpec::default() },
        ] {
            let (_d, model) = load(spec);
            let full = reference(&model);
            // One token at a time (fused attention, seq = 1).
            let mut cache = model.new_cache();
            for (i, &id) in IDS.iter().enumerate() {
                let l = model.forward_last(&[id], &mut cache).unwrap();
                let d = max_abs_diff(&l, &full.get(i).unwrap());
                assert!(d < 5e-5, "{spec:?}: position {i}: {d}");
            }
            // Blocks of 7 (fused attention with a causal mask inside the block).
            let mut cache = model.new_cache();
            let mut parts = Vec::new();
            for chunk in IDS.chunks(7) {
                parts.push(model.forward_all(chunk, &mut cache).unwrap());
            }
            let d = max_abs_diff(&Tensor::cat(&parts, 0).unwrap(), &full);
            assert!(d < 5e-5, "{spec:?}: blocks: {d}");
        }
    }

    /// Bit patterns of a tensor, for bitwise comparisons.
    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn tree_rows_compute_bitwise_as_their_paths_alone_and_keeping_a_path_equals_a_sequence() {
        for spec in [TinySpec::default(), TinySpec { kv_heads: 1, ..TinySpec::default() }] {
            let (_d, model) = load(spec);
            let prefix = &IDS[..15];
            //        0
            //    1   2   3
            //   4 5  6
            //   7
            let shape = tree::TreeShape::new(vec![tree::ROOT, 0, 0, 0, 1, 1, 2, 4]).unwrap();
            let tokens: [u32; 8] = [40, 41, 42, 43, 44, 45, 46, 47];
            let embed = |ids: &[u32]| model.embedder.embed_ids(ids).unwrap();
            let mut cache = model.layers.new_cache();
            model.layers.forward(&embed(prefix), 0, &mut cache).unwrap();
            // The whole tree as one block, and again in two parts (levels 0-1, then the rest).
            let whole = {
                let mut c = cache.clone();
                let y = model.layers.forward_tree(&embed(&tokens), &mut c, shape.mask(15, 0..8)).unwrap();
                (y, c)
            };
            let mut parts = cache.clone();
            let a = model.layers.forward_tree(&embed(&tokens[..4]), &mut parts, shape.mask(15, 0..4)).unwrap();
            let b = model.layers.forward_tree(&embed(&tokens[4..]), &mut parts, shape.mask(15, 4..8)).unwrap();
            assert_eq!(bits(&Tensor::cat(&[&a, &b], 1).unwrap()), bits(&whole.0), "{spec:?}: a tree in parts or at once");
            for node in 0..8 {
                // The node's path alone, token by token (as decoding does).
                let path = shape.path_to(node);
                let mut c = cache.clone();
                let mut last = None;
                for &p in &path {
                    last = Some(model.layers.forward(&embed(&[tokens[p]]), c.len(), &mut c).unwrap());
                }
                let want = last.unwrap();
                assert_eq!(bits(&whole.0.narrow(1, node, 1).unwrap()), bits(&want), "{spec:?}: node {node}");
                // Keeping the path leaves the cache of that sequence: the next token computes the same.
                let mut kept = whole.1.clone();
                kept.keep_path(15, &path).unwrap();
                assert_eq!(kept.len(), c.len());
                let next = embed(&[7]);
                let got = model.layers.forward(&next, kept.len(), &mut kept).unwrap();
                let want = model.layers.forward(&next, c.len(), &mut c).unwrap();
                assert_eq!(bits(&got), bits(&want), "{spec:?}: after keeping the path to {node}");
            }
            // A mask that does not fit is refused, not run.
            let mut c = cache.clone();
            assert!(model.layers.forward_tree(&embed(&tokens[..3]), &mut c, shape.mask(15, 0..4)).is_err());
        }
    }

    /// The generic path (what a GPU, or a compute dtype other than f32, runs: candle's ops, the
    /// tree's mask added to the scores) follows the f32 kernels within the dtype's rounding, for
    /// a prefill block, a branching tree and two sessions packed in one pass.
    #[test]
    fn the_generic_path_in_half_precision_follows_the_f32_kernels() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), TinySpec::default()).unwrap();
        let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
        let exact = loaded.model(DType::F32, &Device::Cpu).unwrap();
        let shape = tree::TreeShape::new(vec![tree::ROOT, 0, 0, 0, 1, 1, 2, 4]).unwrap();
        let tokens: [u32; 8] = [40, 41, 42, 43, 44, 45, 46, 47];
        let embed = |ids: &[u32]| exact.embedder.embed_ids(ids).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // f32: the prefix, the tree over it, and a decode block of another session.
        let mut want_cache = exact.layers.new_cache();
        let want_prefix = exact.layers.forward(&embed(&IDS[..15]), 0, &mut want_cache).unwrap();
        let mut c = want_cache.clone();
        let want_tree = exact.layers.forward_tree(&embed(&tokens), &mut c, shape.mask(15, 0..8)).unwrap();
        let mut other = exact.layers.new_cache();
        exact.layers.forward(&embed(&IDS[20..30]), 0, &mut other).unwrap();
        let want_step = exact.layers.forward(&embed(&IDS[30..32]), 10, &mut other.clone()).unwrap();
        // Measured: f16 within 0.03 of f32 at every row, bf16 within 0.26 (this random tiny
        // model's states are rough on 8 bits of mantissa); a tree mask that lets every row see
        // the whole tree is off by 0.45 to 1.2 in f16, so f16 tells a wrong mask apart and
        // bf16 checks that the path runs.
        for (dtype, tolerance) in [(DType::F16, 0.1), (DType::BF16, 0.4)] {
            let half = loaded.model(dtype, &Device::Cpu).unwrap();
            assert_eq!(half.layers.compute_dtype(), Some(dtype));
            // Blocks arrive as f32 (from the wire) and compute in the stack's dtype.
            let mut cache = half.layers.new_cache();
            let prefix = half.layers.forward(&embed(&IDS[..15]), 0, &mut cache).unwrap();
            assert_eq!(prefix.dtype(), dtype);
            let d = max_abs_diff(&f32_of(&prefix), &want_prefix);
            assert!(d < tolerance, "{dtype:?}: prefix {d}");
            let mut c = cache.clone();
            let got = half.layers.forward_tree(&embed(&tokens), &mut c, shape.mask(15, 0..8)).unwrap();
            for node in 0..8 {
                let d = max_abs_diff(&f32_of(&got.narrow(1, node, 1).unwrap()), &want_tree.narrow(1, node, 1).unwrap());
                assert!(d < tolerance, "{dtype:?}: tree node {node}: {d}");
            }
            // Two sessions packed: the tree beside another session's two-position block.
            let mut o = half.layers.new_cache();
            half.layers.forward(&embed(&IDS[20..30]), 0, &mut o).unwrap();
            let mut c = cache.clone();
            let mut blocks = [
                PackedBlock { x: embed(&tokens), cache: &mut c, tree: Some(shape.mask(15, 0..8)) },
                PackedBlock { x: embed(&IDS[30..32]), cache: &mut o, tree: None },
            ];
            let outs = half.layers.forward_packed(&mut blocks).unwrap();
            let d = max_abs_diff(&f32_of(&outs[0]), &want_tree);
            assert!(d < tolerance, "{dtype:?}: packed tree {d}");
            let d = max_abs_diff(&f32_of(&outs[1]), &want_step);
            assert!(d < tolerance, "{dtype:?}: packed step {d}");
            assert_eq!((c.len(), o.len()), (23, 12));
        }
    }

    #[test]
    fn rollback_forgets_rejected_positions() {
        let (_d, model) = load(TinySpec::default());
        let full = reference(&model);
        let mut cache = model.new_cache();
        model.forward_all(&IDS[..20], &mut cache).unwrap();
        // Feed 5 wrong "drafts", then roll back and feed the right tokens.
        model.forward_all(&[9, 9, 9, 9, 9], &mut cache).unwrap();
        assert_eq!(cache.len(), 25);
        cache.truncate(20);
        let l = model.forward_all(&IDS[20..], &mut cache).unwrap();
        let d = max_abs_diff(&l, &full.narrow(0, 20, 20).unwrap());
        assert!(d < 5e-5, "{d}");
    }

    #[test]
    fn positions_must_follow_the_cache() {
        let (_d, model) = load(TinySpec::default());
        let mut cache = model.new_cache();
        let x = model.embedder.embed_ids(&IDS[..3]).unwrap();
        let err = model.layers.forward(&x, 2, &mut cache).unwrap_err().to_string();
        assert!(err.contains("does not follow the cache"), "{err}");
        assert!(model.embedder.embed_ids(&[100_000]).is_err());
    }

    #[test]
    fn a_draft_beside_the_truth_sees_what_it_sees_behind_a_verified_cache() {
        let (_d, model) = load(TinySpec::default());
        let truth = model.embedder.embed_ids(&IDS[..12]).unwrap();
        let drafted = model.embedder.embed_ids(&IDS[20..32]).unwrap();
        let truth_kv = model.layers.keys_values(&truth).unwrap();
        for (ops, given) in [(Ops::Fused, false), (Ops::Differentiable, false), (Ops::Differentiable, true)] {
            let stack = model.layers.clone().with_ops(ops);
            // The true stream run alongside, or its keys and values computed beforehand.
            let given_truth = if given { Truth::KeysValues(&truth_kv) } else { Truth::States(&truth) };
            let beside = stack.forward_beside(&drafted, given_truth).unwrap();
            for t in 0..12 {
                // At run time: the cache holds the verified (true) positions before t, then the
                // draft at t runs as one query.
                let mut cache = model.layers.new_cache();
                if t > 0 {
                    model.layers.forward(&truth.narrow(1, 0, t).unwrap(), 0, &mut cache).unwrap();
                }
                let want = model.layers.forward(&drafted.narrow(1, t, 1).unwrap(), t, &mut cache).unwrap();
                let d = max_abs_diff(&beside.narrow(1, t, 1).unwrap(), &want);
                assert!(d < 5e-5, "{ops:?}, keys and values given: {given}, position {t}: {d}");
            }
        }
        // Drafted = truth: the plain causal pass.
        let same = model.layers.forward_beside(&truth, Truth::States(&truth)).unwrap();
        let plain = model.layers.forward(&truth, 0, &mut model.layers.new_cache()).unwrap();
        assert!(max_abs_diff(&same, &plain) < 5e-5);
        let short = drafted.narrow(1, 0, 5).unwrap();
        assert!(model.layers.forward_beside(&short, Truth::States(&truth)).is_err());
        assert!(model.layers.forward_beside(&short, Truth::KeysValues(&truth_kv)).is_err());
        assert!(model.layers.forward_beside(&drafted, Truth::KeysValues(&truth_kv[1..])).is_err());
    }

    #[test]
    fn differentiable_ops_match_fused_ops_and_have_gradients() {
        let (_d, model) = load(TinySpec::default());
        let full = reference(&model);
        let diff = Model {
            layers: model.layers.clone().with_ops(Ops::Differentiable),
            head: model.head.clone().with_ops(Ops::Differentiable),
            ..model.clone()
        };
        let mut cache = diff.new_cache();
        let l = diff.forward_all(&IDS, &mut cache).unwrap();
        let d = max_abs_diff(&l, &full);
        assert!(d < 5e-5, "{d}");

        // A gradient flows from the logits back to the input hidden states.
        let x = candle_core::Var::from_tensor(&model.embedder.embed_ids(&IDS[..8]).unwrap()).unwrap();
        let y = diff.layers.forward(x.as_tensor(), 0, &mut diff.new_cache()).unwrap();
        let loss = diff.head.forward(&y).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("gradient for the input");
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn layer_ranges_compose_to_the_whole_model() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), TinySpec::default()).unwrap();
        let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
        let model = loaded.model(DType::F32, &Device::Cpu).unwrap();
        let vb = loaded.weights.var_builder(DType::F32, &Device::Cpu).unwrap();
        let rope = Arc::new(Rope::new(&loaded.config, DType::F32, &Device::Cpu).unwrap());
        let stacks: Vec<LayerStack> =
            [0..1, 1..4, 4..6].into_iter().map(|r| LayerStack::load(&vb, &loaded.config, r, rope.clone()).unwrap()).collect();
        let mut caches: Vec<StackCache> = stacks.iter().map(LayerStack::new_cache).collect();
        let mut x = model.embedder.embed_ids(&IDS).unwrap();
        for (s, c) in stacks.iter().zip(caches.iter_mut()) {
            x = s.forward(&x, 0, c).unwrap();
        }
        let l = model.head.forward(&x).unwrap().squeeze(0).unwrap();
        assert!(max_abs_diff(&l, &reference(&model)) < 1e-5);
        assert!(LayerStack::load(&vb, &loaded.config, 4..7, rope).is_err());
    }
}

/// Block sizes (positions) at which this engine changes kernels on CPU: up to
/// [`kernels::SMALL_M`] rows multiply through the small-block kernel, up to the returned
/// `attention_rows` attend through the row-by-row kernel ([`kernels::causal_attention`]).
/// Cost models treat the regimes apart.
pub fn kernel_regimes(cfg: &ModelConfig) -> (usize, usize) {
    let n_rep = (cfg.num_attention_heads / cfg.num_key_value_heads.max(1)).max(1);
    (kernels::SMALL_M, kernels::MAX_FUSED_ROWS / n_rep)
}
