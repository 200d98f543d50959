//! Small fused CPU kernels where candle's generic ops lose to dispatch overhead or strided access.
//! Inference only (no backward): training uses [`crate::model::Ops::Differentiable`], which never
//! comes here.
//!
//! ## Causal attention for short query blocks (decode steps, draft blocks)
//!
//! For a handful of query rows, candle's batched matmul + softmax + matmul costs ~100 µs per
//! layer in thread-pool dispatch alone, far more than the arithmetic. [`causal_attention`]
//! computes `softmax(q kᵀ · scale + causal mask) v` straight from the (strided) cache views, in
//! tiles of up to 16 query rows of one K/V group that read each key and value once for all their
//! rows (memory traffic, not arithmetic, bounds it at long contexts), with AVX2/FMA dot products
//! when the CPU has them. Each row is computed the same way whatever the block or tile it is in,
//! so a token's result does not depend on how many tokens were fed with it.
//!
//! ## Matmuls with few rows (decode steps, draft and verification blocks)
//!
//! For `m <= 16` rows, gemm's packing and dispatch make a block of 5 tokens cost ~2× one token,
//! although reading the weights (memory-bound) is the same work. [`small_m_matmul`] reads each
//! weight row once and computes its dot products with all `m` rows (AVX2/FMA when the CPU has
//! it), prefetching the weight rows a few rows ahead into L2 (without that, the arithmetic for several
//! input rows fills the out-of-order window while it waits on the weights, and each extra row
//! costs ~10 %), so verifying γ+1 drafted positions costs about as much as one. Each output element is
//! computed in the same order whatever `m` is: a token's result does not depend on how many
//! tokens were fed with it (greedy speculative decoding then reproduces one-by-one decoding
//! exactly).
//!
//! Each task computes its block of weight rows against all input rows and writes it into its own
//! columns of the output (a transpose after the tasks ran alone on one thread: 4 % of a
//! 16-session packed pass, with the other core idle).
//!
//! ## Instruction sets
//!
//! AVX2/FMA where the CPU has it, AVX-512 ([`avx512`]) where it has that too: the same bits as
//! AVX2 (one 16-lane accumulator holds exactly the AVX2 kernels' two 8-lane ones, reduced in
//! the same order), with half the FMA instructions and tiles of 4 weight rows by 6 input rows in
//! its 32 registers, which is what a packed pass over many sessions (compute-bound) needs. The
//! attention scores [`KEY_BLOCK`] keys at a time where every row sees them (their horizontal
//! sums side by side, [`sum_lanes8`], in the same order as one by one) and keeps a row's value
//! sums in registers across the keys. `HAT_CPU_KERNELS=avx2|scalar` caps the choice ([`Isa`]).
//!
//! Where a matrix's f32 values are exactly 4-bit affine blocks ([`crate::model::q4`]), [`q4`]
//! computes the same bits as the f32 kernel from the blocks (a fifth of the bytes).
//!
//! The draft path's 8-bit matmuls and the head's screen, which need not be exact, use AVX-512
//! VNNI integer dot products where the CPU has them ([`vnni`], [`has_vnni`]);
//! `HAT_CPU_KERNELS=avx512` keeps AVX-512 but not VNNI (the 8-bit weights then convert to f32).
//!
//! ## SwiGLU on the fused gate/up projection
//!
//! The MLP's gate and up projections run as one matmul whose output is `[gate | up]` along the
//! last axis; [`swiglu`] reads both halves and writes `silu(gate) * up` contiguously in one pass
//! (candle's unary/binary ops on the two strided halves cost ~3× more).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q4;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni;

/// Query rows up to which [`causal_attention`] is used instead of matmuls.
pub const MAX_FUSED_ROWS: usize = 64;

/// `q`: `(b, g, rows, d)` contiguous, the `rows = rep * seq` query rows of the `rep` heads that
/// share K/V group `g` (rep-major); `k`, `v`: `(b, g, len, d)`, any strides with a contiguous last
/// dim. Causal: query `i` of a block (row `r`, `i = r % seq`) sees keys `[0, pos + i]`,
/// `pos = len - seq`; a tree: keys `[0, prefix)` and its ancestors' and own slots.
#[derive(Debug, Clone)]
struct CausalAttention {
    seq: usize,
    scale: f32,
    tree: Option<std::sync::Arc<crate::model::tree::TreeMask>>,
    isa: Isa,
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "hat-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("hat-causal-attention: f32 only")
        };
        let (b, g, rows, d) = dims4(lq)?;
        let (_, _, len, _) = dims4(lk)?;
        if !lq.is_contiguous() || lk.stride()[3] != 1 || lv.stride()[3] != 1 || dims4(lv)? != dims4(lk)? {
            candle_core::bail!("hat-causal-attention: unexpected layouts")
        }
        let q = &q[lq.start_offset()..];
        let (ks, vs) = (lk.stride(), lv.stride());
        let (k, v) = (&k[lk.start_offset()..], &v[lv.start_offset()..]);
        let pos = len - self.seq;
        if let Some(t) = &self.tree {
            if t.rows() != self.seq || t.prefix > pos || t.visible.iter().flatten().any(|&j| j < t.prefix || j >= len) {
                candle_core::bail!("hat-causal-attention: a tree mask of {} rows after {} slots does not fit {len} keys", t.rows(), t.prefix)
            }
        }
        let mut out = vec![0f32; b * g * rows * d];
        let isa = self.isa;
        // Tiles of up to ATTENTION_TILE rows of one K/V group read each key and value once for
        // all their rows; each row's arithmetic is that of the row alone.
        let tiles_per_group = rows.div_ceil(ATTENTION_TILE);
        let tile_fn = |(t, o): (usize, &mut [f32])| {
            let (group, tile) = (t / tiles_per_group, t % tiles_per_group);
            let (bi, gi) = (group / g, group % g);
            let first = tile * ATTENTION_TILE;
            let n = o.len() / d;
            let block = AttentionTile {
                q: &q[(group * rows + first) * d..(group * rows + first + n) * d],
                k: &k[bi * ks[0] + gi * ks[1]..],
                v: &v[bi * vs[0] + gi * vs[1]..],
                k_stride: ks[2],
                v_stride: vs[2],
                visible: (first..first + n)
                    .map(|r| match &self.tree {
                        None => RowKeys { prefix: pos + r % self.seq + 1, extra: &[] },
                        Some(t) => RowKeys { prefix: t.prefix, extra: &t.visible[r % self.seq] },
                    })
                    .collect(),
                scale: self.scale,
            };
            #[cfg(target_arch = "x86_64")]
            match isa {
                // SAFETY: the CPU has what `isa` names (`Isa::detected`).
                Isa::Avx512 => return unsafe { attend_tile_avx512(&block, o) },
                // SAFETY: as above.
                Isa::Avx2 => return unsafe { attend_tile_avx2(&block, o) },
                Isa::Scalar => {}
            }
            let _ = isa;
            attend_tile(&block, o, dot8, |a, keys| keys.map(|b| dot8(a, b)))
        };
        // Output chunks: the tiles of each group (the last tile of a group may be shorter).
        let mut chunks: Vec<&mut [f32]> = Vec::with_capacity(b * g * tiles_per_group);
        for group in out.chunks_mut(rows * d) {
            chunks.extend(group.chunks_mut(ATTENTION_TILE * d));
        }
        let work = b * g * rows * len * d;
        if work > 1 << 16 {
            chunks.into_par_iter().enumerate().for_each(tile_fn);
        } else {
            chunks.into_iter().enumerate().for_each(tile_fn);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g, rows, d))))
    }
}

/// Causal attention for a block of `seq` queries after `len - seq` cached positions; shapes as
/// in the op above. Returns `(b, g, rows, d)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, seq: usize, scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &CausalAttention { seq, scale, tree: None, isa: Isa::detected() })
}

/// Attention for the rows of a tree block ([`crate::model::tree::TreeMask`]): each row sees the
/// slots before the mask's prefix and its own further slots; shapes as in [`causal_attention`].
pub fn tree_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: std::sync::Arc<crate::model::tree::TreeMask>, scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &CausalAttention { seq: mask.rows(), scale, tree: Some(mask), isa: Isa::detected() })
}

/// The keys a query row sees: `[0, prefix)`, then the slots in `extra` (increasing, at or after
/// `prefix`).
struct RowKeys<'a> {
    prefix: usize,
    extra: &'a [usize],
}

impl RowKeys<'_> {
    /// One past the last key seen.
    fn end(&self) -> usize {
        self.extra.last().map_or(self.prefix, |&j| j + 1)
    }

    fn count(&self) -> usize {
        self.prefix + self.extra.len()
    }
}

/// Query rows of one K/V group that [`CausalAttention`] computes together.
const ATTENTION_TILE: usize = 16;

/// Consecutive query rows of one K/V group: their keys and values from the group's start.
struct AttentionTile<'a> {
    /// `(n, d)` query rows.
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    k_stride: usize,
    v_stride: usize,
    /// Per row: the keys attended.
    visible: Vec<RowKeys<'a>>,
    scale: f32,
}

/// Keys scored at a time where every row of a tile sees them.
const KEY_BLOCK: usize = 8;
/// Output lanes of a row summed together over the values (in registers: four AVX-512 or eight
/// AVX2 vectors).
const VALUE_LANES: usize = 64;

/// `softmax(q kᵀ · scale) v` for each row of a tile into `o` (zeroed, `(n, d)`): scores key by
/// key for every row, softmax per row, then values key by key. The arithmetic of a row (its
/// dot products, the order of its sums) is the same whatever tile it is in. `dot` scores one
/// key, `dots` [`KEY_BLOCK`] keys at once, each exactly as `dot` would (the keys every row sees,
/// `[0, min prefix)`, go by blocks; the rest one by one with the mask).
#[inline(always)]
fn attend_tile(t: &AttentionTile<'_>, o: &mut [f32], dot: impl Fn(&[f32], &[f32]) -> f32, dots: impl Fn(&[f32], [&[f32]; KEY_BLOCK]) -> [f32; KEY_BLOCK]) {
    let d = o.len() / t.visible.len().max(1);
    let most = t.visible.iter().map(RowKeys::end).max().unwrap_or(0);
    // A row's extra slots all lie at or after its prefix, so every row sees `[0, blocked)`.
    let common = t.visible.iter().map(|keys| keys.prefix).min().unwrap_or(0).min(most);
    let blocked = common / KEY_BLOCK * KEY_BLOCK;
    let key = |j: usize| &t.k[j * t.k_stride..j * t.k_stride + d];
    let mut scores: Vec<Vec<f32>> = t.visible.iter().map(|keys| Vec::with_capacity(keys.count())).collect();
    for j0 in (0..blocked).step_by(KEY_BLOCK) {
        let keys = std::array::from_fn(|i| key(j0 + i));
        for (r, s) in scores.iter_mut().enumerate() {
            s.extend(dots(&t.q[r * d..(r + 1) * d], keys).map(|x| x * t.scale));
        }
    }
    // Per row, how many of its extra slots the walk over the keys has passed.
    let mut passed = vec![0usize; t.visible.len()];
    let sees = |keys: &RowKeys<'_>, passed: &mut usize, j: usize| -> bool {
        if j < keys.prefix {
            return true;
        }
        if keys.extra.get(*passed) == Some(&j) {
            *passed += 1;
            return true;
        }
        false
    };
    for j in blocked..most {
        let kr = key(j);
        for (r, s) in scores.iter_mut().enumerate() {
            if sees(&t.visible[r], &mut passed[r], j) {
                s.push(dot(&t.q[r * d..(r + 1) * d], kr) * t.scale);
            }
        }
    }
    for s in scores.iter_mut() {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
    }
    // The values every row sees, row by row (each output element still sums over the keys in
    // order), then the rest key by key with the mask.
    let value = |j: usize| &t.v[j * t.v_stride..j * t.v_stride + d];
    for (r, s) in scores.iter().enumerate() {
        for (c, out) in o[r * d..(r + 1) * d].chunks_mut(VALUE_LANES).enumerate() {
            let lanes = c * VALUE_LANES..c * VALUE_LANES + out.len();
            if let Ok(out) = <&mut [f32; VALUE_LANES]>::try_from(&mut *out) {
                // A whole chunk: its sums stay in registers across the keys.
                let mut acc = *out;
                for (j, &w) in s[..blocked].iter().enumerate() {
                    acc.iter_mut().zip(&value(j)[lanes.start..][..VALUE_LANES]).for_each(|(o, x)| *o += w * x);
                }
                *out = acc;
            } else {
                for (j, &w) in s[..blocked].iter().enumerate() {
                    out.iter_mut().zip(&value(j)[lanes.clone()]).for_each(|(o, x)| *o += w * x);
                }
            }
        }
    }
    passed.iter_mut().for_each(|p| *p = 0);
    // Per row, the next of its scores.
    let mut next = vec![blocked; t.visible.len()];
    for j in blocked..most {
        let vr = value(j);
        for (r, s) in scores.iter().enumerate() {
            if sees(&t.visible[r], &mut passed[r], j) {
                let w = s[next[r]];
                next[r] += 1;
                o[r * d..(r + 1) * d].iter_mut().zip(vr).for_each(|(o, x)| *o += w * x);
            }
        }
    }
}

/// [`attend_tile`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tile_avx2(t: &AttentionTile<'_>, o: &mut [f32]) {
    attend_tile(t, o, |a, b| dot_avx2(a, b), |a, keys| dots_keys_avx2(a, keys))
}

/// [`attend_tile`] compiled for AVX-512, bit for bit [`attend_tile_avx2`]'s results (the same
/// dot products, and lane-wise arithmetic that does not depend on the vector width).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_tile_avx512(t: &AttentionTile<'_>, o: &mut [f32]) {
    attend_tile(t, o, |a, b| avx512::dot(a, b), |a, keys| avx512::dots_keys(a, keys))
}

/// `a · keys[i]` for [`KEY_BLOCK`] keys, each exactly as [`dot_avx2`] computes it (the eight
/// horizontal sums done side by side, [`sum_lanes8`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_keys_avx2(a: &[f32], keys: [&[f32]; KEY_BLOCK]) -> [f32; KEY_BLOCK] {
    use std::arch::x86_64::*;
    let n = keys.iter().map(|k| k.len()).fold(a.len(), usize::min);
    let pairs = n / 16;
    let pa = a.as_ptr();
    let halves = keys.map(|b| {
        let pb = b.as_ptr();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in 0..pairs {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c * 16)), _mm256_loadu_ps(pb.add(c * 16)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c * 16 + 8)), _mm256_loadu_ps(pb.add(c * 16 + 8)), acc1);
        }
        _mm256_add_ps(acc0, acc1)
    });
    let mut sums = sum_lanes8(halves);
    for (s, b) in sums.iter_mut().zip(keys) {
        for j in pairs * 16..n {
            *s = a[j].mul_add(b[j], *s);
        }
    }
    sums
}

/// The eight lanes of each of eight vectors summed exactly as [`sum_pair`] sums `a + b`'s:
/// `(lo + hi)` per lane pair of halves, then `(l0 + l1) + (l2 + l3)`, for all eight at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn sum_lanes8(v: [std::arch::x86_64::__m256; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    // [v_i.lo + v_i.hi | v_{i+1}.lo + v_{i+1}.hi]: each half is `sum_pair`'s `s4`.
    let quads = |a: __m256, b: __m256| _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    let (s01, s23, s45, s67) = (quads(v[0], v[1]), quads(v[2], v[3]), quads(v[4], v[5]), quads(v[6], v[7]));
    // hadd: (l0 + l1), (l2 + l3) of each, then their sum; lanes come out as 0 2 4 6 1 3 5 7.
    let r = _mm256_hadd_ps(_mm256_hadd_ps(s01, s23), _mm256_hadd_ps(s45, s67));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), r);
    [lanes[0], lanes[4], lanes[1], lanes[5], lanes[2], lanes[6], lanes[3], lanes[7]]
}

/// `a · b` in eight FMA lanes, summed as [`sum_pair`] does (the same order for every row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let pairs = n / 16;
    for c in 0..pairs {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c * 16)), _mm256_loadu_ps(pb.add(c * 16)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c * 16 + 8)), _mm256_loadu_ps(pb.add(c * 16 + 8)), acc1);
    }
    let mut sum = sum_pair(acc0, acc1);
    for j in pairs * 16..n {
        sum = a[j].mul_add(b[j], sum);
    }
    sum
}

/// `a · b` with eight partial sums in a fixed order (vectorised; the same arithmetic for a row
/// whatever the block it is in).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Rows up to which [`small_m_matmul`] replaces gemm.
pub const SMALL_M: usize = 12;
/// Rows up to which [`small_m_matmul`] serves blocks that must compute each row exactly as alone
/// (draft trees), whatever gemm would cost.
pub const EXACT_ROWS: usize = 64;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;
/// How many weight rows ahead the kernels prefetch (measured on the 26 middle layers, one core:
/// a 3-row block 48.6 → 38.7 ms, one row 40.7 → 35.3 ms; 2 to 8 rows ahead do about as well).
/// They prefetch into L2 (`_MM_HINT_T1`), not L1: on an AMD EPYC (one core, weights from
/// memory) one decoder layer's f32 projections for one row took 1.23 ms with L1 prefetches and
/// 0.75 ms with L2 ones (the L1 prefetches hold the few L1 miss slots the loads need);
/// `cargo bench --bench engine` part `q8`.
pub(crate) const PREFETCH_ROWS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct SmallMMatmul {
    isa: Isa,
}

/// The instruction sets the exact kernels come in. Within one CPU, [`Isa::Avx2`] and
/// [`Isa::Avx512`] compute bit for bit the same ([`avx512`]); [`Isa::Scalar`] rounds differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best the CPU has, capped by `HAT_CPU_KERNELS` (`avx2` or `scalar`) when set, for
    /// measuring one against another in one binary.
    pub(crate) fn detected() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = match std::env::var("HAT_CPU_KERNELS").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            Self::supported().into_iter().filter(|&i| i <= cap).max().unwrap_or(Isa::Scalar)
        })
    }

    /// Every instruction set this CPU can run the kernels in.
    pub(crate) fn supported() -> Vec<Isa> {
        let mut all = vec![Isa::Scalar];
        if has_avx2_fma() {
            all.push(Isa::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            all.push(Isa::Avx512);
        }
        all
    }
}


/// Dot products of one weight row with `m` input rows (`x`: `m * k`), in a fixed order.
#[inline(always)]
fn dots_scalar(w: &[f32], x: &[f32], k: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let xi = &x[i * k..(i + 1) * k];
        let mut acc = [0f32; 8];
        let chunks = k / 8;
        for c in 0..chunks {
            for l in 0..8 {
                acc[l] = w[c * 8 + l].mul_add(xi[c * 8 + l], acc[l]);
            }
        }
        let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for j in chunks * 8..k {
            sum = w[j].mul_add(xi[j], sum);
        }
        *o = sum;
    }
}

/// What a weight matrix holds: f32 (the LLM path), or i8 with a scale per row that the caller
/// applies (the draft path, [`crate::model::q8`]). The vector kernels are generic over it; each
/// element type keeps its own arithmetic in every instruction set.
pub(crate) trait Weight: Copy + Sync {
    /// Whether a last half chunk of 8 goes into the first accumulator by FMA (f32) or to the
    /// scalar tail (i8).
    const HALF_CHUNK: bool;
    /// Chunks of 16 per 64-byte cache line (the prefetch runs once a line).
    const CHUNKS_PER_LINE: usize;
    /// The scalar tail's step.
    fn tail(sum: f32, w: Self, x: f32) -> f32;
    /// Dot products of one weight row with `out.len()` input rows without vector units.
    fn dots_scalar(w: &[Self], x: &[f32], k: usize, out: &mut [f32]);
    /// 16 weights from `p` as two 8-lane f32 vectors (inlined into AVX2 callers).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 2];
    /// 16 weights from `p` as one 16-lane f32 vector (inlined into AVX-512 callers).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx512(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    const HALF_CHUNK: bool = true;
    const CHUNKS_PER_LINE: usize = 1;
    #[inline(always)]
    fn tail(sum: f32, w: f32, x: f32) -> f32 {
        w.mul_add(x, sum)
    }
    #[inline(always)]
    fn dots_scalar(w: &[f32], x: &[f32], k: usize, out: &mut [f32]) {
        dots_scalar(w, x, k, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Weight for i8 {
    const HALF_CHUNK: bool = false;
    const CHUNKS_PER_LINE: usize = 4;
    #[inline(always)]
    fn tail(sum: f32, w: i8, x: f32) -> f32 {
        sum + w as f32 * x
    }
    fn dots_scalar(w: &[i8], x: &[f32], k: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let xi = &x[i * k..(i + 1) * k];
            *o = w.iter().zip(xi).map(|(&a, &b)| a as f32 * b).sum();
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const i8) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        let raw = _mm_loadu_si128(p as *const __m128i);
        [_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)))]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const i8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
}

/// Dot products of `R` weight rows (`w`: `R * k`, contiguous) with `G` input rows starting at
/// row `first`, into `out[r][first + g]`: two accumulators per pair (chunks of 16; f32's half
/// chunk into the first), each input row loaded once for all `R`. The arithmetic of an element
/// never depends on `R` or `G`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_group<W: Weight, const R: usize, const G: usize>(w: [&[W]; R], x: &[f32], k: usize, first: usize, out: &mut [&mut [f32]; R]) {
    use std::arch::x86_64::*;
    let pairs = k / 16;
    let mut acc = [[[_mm256_setzero_ps(); 2]; G]; R];
    let xp = x.as_ptr().add(first * k);
    for c in 0..pairs {
        let mut wv = [[_mm256_setzero_ps(); 2]; R];
        for (v, wr) in wv.iter_mut().zip(&w) {
            if c % W::CHUNKS_PER_LINE == 0 {
                // The row a few rows on (the next tasks' rows follow these in memory): its loads
                // then hit the cache instead of filling the out-of-order window while the
                // arithmetic for several input rows waits on them. Prefetches never fault.
                _mm_prefetch(wr.as_ptr().wrapping_add(PREFETCH_ROWS * k + c * 16) as *const i8, _MM_HINT_T1);
            }
            *v = W::load16_avx2(wr.as_ptr().add(c * 16));
        }
        for g in 0..G {
            let x0 = _mm256_loadu_ps(xp.add(g * k + c * 16));
            let x1 = _mm256_loadu_ps(xp.add(g * k + c * 16 + 8));
            for (a, v) in acc.iter_mut().zip(&wv) {
                a[g][0] = _mm256_fmadd_ps(v[0], x0, a[g][0]);
                a[g][1] = _mm256_fmadd_ps(v[1], x1, a[g][1]);
            }
        }
    }
    let half = W::HALF_CHUNK && k - pairs * 16 >= 8;
    if half {
        for (a, wr) in acc.iter_mut().zip(&w) {
            // Only f32 has a half chunk.
            let w0 = _mm256_loadu_ps(wr.as_ptr().add(pairs * 16) as *const f32);
            for (g, a) in a.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(g * k + pairs * 16)), a[0]);
            }
        }
    }
    let tail = pairs * 16 + if half { 8 } else { 0 };
    for ((a, wr), o) in acc.iter().zip(&w).zip(out.iter_mut()) {
        for (g, a) in a.iter().enumerate() {
            let mut sum = sum_pair(a[0], a[1]);
            for j in tail..k {
                sum = W::tail(sum, wr[j], x[(first + g) * k + j]);
            }
            o[first + g] = sum;
        }
    }
}

/// `a + b` summed across its eight lanes, in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sum_pair(a: std::arch::x86_64::__m256, b: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm256_add_ps(a, b);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let mut lanes = [0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), s4);
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

/// All `m` input rows against `R` weight rows, in groups of at most `G_MAX` (four for one
/// weight row, three for two: what 16 vector registers hold).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<W: Weight, const R: usize>(w: [&[W]; R], x: &[f32], k: usize, m: usize, mut out: [&mut [f32]; R]) {
    let most = if R == 1 { 4 } else { 3 };
    let mut i = 0;
    while i < m {
        match (m - i).min(most) {
            1 => dots_group::<W, R, 1>(w, x, k, i, &mut out),
            2 => dots_group::<W, R, 2>(w, x, k, i, &mut out),
            3 => dots_group::<W, R, 3>(w, x, k, i, &mut out),
            _ => dots_group::<W, R, 4>(w, x, k, i, &mut out),
        }
        i += (m - i).min(most);
    }
}

/// Which kernels this binary computes with on this CPU, e.g. `k2-avx512-vnni`: a revision, raised
/// whenever a kernel's speed changes (prefetching, instructions), and the instruction sets in
/// use. Cached quick profiles carry it in their names, so that timings measured with other
/// kernels are measured again.
pub fn kernels_tag() -> String {
    /// Raised when the kernels' speed changes.
    const REVISION: u32 = 4;
    let isa = match Isa::detected() {
        Isa::Scalar => "scalar",
        Isa::Avx2 => "avx2",
        Isa::Avx512 => "avx512",
    };
    let vnni = if has_vnni() { "-vnni" } else { "" };
    let packed = if crate::model::q4::enabled() { "-q4" } else { "" };
    format!("k{REVISION}-{isa}{vnni}{packed}")
}

/// Whether the 8-bit kernels may use AVX-512 VNNI ([`vnni`]): the CPU has it (with AVX-512BW)
/// and `HAT_CPU_KERNELS` (`avx512`, `avx2` or `scalar`) does not cap it off.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            Isa::detected() == Isa::Avx512
                && std::env::var("HAT_CPU_KERNELS").as_deref() != Ok("avx512")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl candle_core::CustomOp2 for SmallMMatmul {
    fn name(&self) -> &'static str {
        "hat-small-m-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout, ws: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else { candle_core::bail!("hat-small-m-matmul: f32 only") };
        if !lx.is_contiguous() || !lw.is_contiguous() {
            candle_core::bail!("hat-small-m-matmul: inputs must be contiguous")
        }
        let (n, k) = lw.shape().dims2()?;
        let dims = lx.dims();
        let m = lx.shape().elem_count() / k;
        if dims.last() != Some(&k) || m > EXACT_ROWS {
            candle_core::bail!("hat-small-m-matmul: bad shapes {dims:?} x ({n}, {k})")
        }
        let x = &x[lx.start_offset()..lx.start_offset() + m * k];
        let w = &w[lw.start_offset()..lw.start_offset() + n * k];
        let isa = self.isa;
        let out = by_weight_rows(n, m, ROWS_PER_TASK, true, |j0, block| {
            let rows = block.len() / m;
            dot_rows(isa, &w[j0 * k..(j0 + rows) * k], x, k, m, block);
        });
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `block[r * m + i] = w_r · x_i` for the `block.len() / m` weight rows in `w` and the `m` input
/// rows in `x`, in `isa`'s arithmetic (i8 weights unscaled).
pub(crate) fn dot_rows<W: Weight>(isa: Isa, w: &[W], x: &[f32], k: usize, m: usize, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa::detected`/`Isa::supported` only name what the CPU has; `w` and `x` hold
        // `rows * k` and `m * k` values.
        Isa::Avx512 => return unsafe { avx512::dots(w, x, k, m, block) },
        Isa::Avx2 => {
            for (p, out) in block.chunks_mut(2 * m).enumerate() {
                let j = 2 * p;
                if let (true, Some((oa, ob))) = (m > 1, out.split_at_mut_checked(m).filter(|(_, ob)| ob.len() == m)) {
                    // Two weight rows at once (each input row loaded once for both); every
                    // output element computes exactly as with one.
                    // SAFETY: as above; slices bound all reads.
                    unsafe { dots_avx2::<W, 2>([&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k]], x, k, m, [oa, ob]) };
                    continue;
                }
                for (r, o) in out.chunks_mut(m).enumerate() {
                    // SAFETY: as above.
                    unsafe { dots_avx2::<W, 1>([&w[(j + r) * k..(j + r + 1) * k]], x, k, m, [o]) };
                }
            }
            return;
        }
        Isa::Scalar => {}
    }
    let _ = isa;
    for (r, o) in block.chunks_mut(m).enumerate() {
        W::dots_scalar(&w[r * k..(r + 1) * k], x, k, o);
    }
}

/// The `(m, n)` row-major product of `n` weight rows with `m` input rows, computed by tasks of
/// `rows_per_task` weight rows (in parallel when `parallel`): `fill(j0, block)` fills `block`,
/// `(rows, m)` weight-row-major, for the weight rows `j0..j0 + rows`, and the task then writes
/// it into its own columns of the output (no transpose after the tasks, which ran alone on one
/// thread: 4 % of a 16-session packed pass). The block is a per-thread scratch buffer, never
/// zeroed between tasks: `fill` must write every element.
pub(crate) fn by_weight_rows(n: usize, m: usize, rows_per_task: usize, parallel: bool, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    thread_local! {
        static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let dst = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let j0 = t * rows_per_task;
        let rows = rows_per_task.min(n - j0);
        BLOCK.with_borrow_mut(|buf| {
            if buf.len() < rows * m {
                buf.resize(rows * m, 0.0);
            }
            let block = &mut buf[..rows * m];
            fill(j0, block);
            for i in 0..m {
                for (r, v) in block.chunks_exact(m).map(|b| b[i]).enumerate() {
                    // SAFETY: `i * n + j0 + r < m * n`, and no other task writes the columns
                    // `j0..j0 + rows`; `out` outlives the tasks.
                    unsafe { dst.get().add(i * n + j0 + r).write(v) };
                }
            }
        });
    };
    let tasks = n.div_ceil(rows_per_task.max(1));
    if parallel && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    out
}

/// An output shared by tasks that write disjoint elements of it ([`by_weight_rows`]).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the bare field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x · wᵀ` for `x` `(..., k)` with at most [`EXACT_ROWS`] rows and `w` `(n, k)`: `(..., n)`.
pub fn small_m_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &SmallMMatmul { isa: Isa::detected() })
}

/// Whether a tensor is f32 on the CPU (where these kernels run).
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

#[derive(Debug, Clone, Copy)]
struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "hat-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { candle_core::bail!("hat-swiglu: f32 only") };
        if !l.is_contiguous() {
            candle_core::bail!("hat-swiglu: input must be contiguous")
        }
        let dims = l.dims();
        let two_i = dims[dims.len() - 1];
        if two_i % 2 != 0 {
            candle_core::bail!("hat-swiglu: last dim {two_i} is odd")
        }
        let i = two_i / 2;
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let mut out = vec![0f32; x.len() / 2];
        let row = |(o, r): (&mut [f32], &[f32])| {
            let (gate, up) = r.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        if out.len() > 1 << 15 {
            out.par_chunks_mut(i).zip(x.par_chunks(two_i)).for_each(row);
        } else {
            out.chunks_mut(i).zip(x.chunks(two_i)).for_each(row);
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = i;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `silu(x[..., :I]) * x[..., I:]` for `x` of shape `(..., 2I)` (contiguous, f32, CPU) → `(..., I)`.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.apply_op1_no_bwd(&SwiGlu)
}

/// `x @ w_t` for a weight that does not train, `x`: `(..., m, k)`, `w_t`: `(k, n)` or one per
/// batch row `(batch, k, n)` → `(..., m, n)`. candle's matmul backward always computes both
/// operands' gradients; this op's backward gives only `x`'s (`grad @ w_tᵀ`), which halves the
/// backward cost of the frozen layers that gradients flow through in adapter training (the
/// output submodel, the head).
pub fn frozen_matmul(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w_t, FrozenMatmul)
}

struct FrozenMatmul;

impl candle_core::CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (xd, wd) = (lx.dims(), lw.dims());
        let [.., k, n] = *wd else { candle_core::bail!("frozen-matmul: w_t {wd:?} is not a matrix") };
        if !lx.is_contiguous() || xd.last() != Some(&k) {
            candle_core::bail!("frozen-matmul: x {xd:?} (contiguous) against w_t {wd:?}");
        }
        let mut out_dims = xd.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let y = match wd.len() {
            // One weight for every row: x as one (rows, k) matrix.
            2 => {
                let rows = lx.shape().elem_count() / k.max(1);
                x.matmul(w, (1, rows, n, k), &Layout::contiguous_with_offset((rows, k), lx.start_offset()), lw)?
            }
            3 if xd.len() == 3 && xd[0] == wd[0] => x.matmul(w, (xd[0], xd[1], n, k), lx, lw)?,
            _ => candle_core::bail!("frozen-matmul: x {xd:?} against w_t {wd:?}"),
        };
        Ok((y, Shape::from(out_dims)))
    }

    fn bwd(&self, _x: &Tensor, w_t: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.broadcast_matmul(&w_t.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::Device;

    #[test]
    fn frozen_matmul_gives_the_inputs_gradient_only() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (13, 7), &dev).unwrap(); // (n, k), frozen
        let x = candle_core::Var::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 5, 13), &dev).unwrap();
        let loss = |y: Tensor| (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        let want_y = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let got_y = frozen_matmul(x.as_tensor(), &w.t().unwrap()).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(&got_y, &want_y) < 1e-5);
        let want = loss(want_y).backward().unwrap();
        let got = loss(got_y).backward().unwrap();
        assert!(max_diff(got.get(x.as_tensor()).unwrap(), want.get(x.as_tensor()).unwrap()) < 1e-4);
        // Batched weights (one per row), as for the head's candidate tokens.
        let wb = Tensor::randn(0f32, 1.0, (2, 7, 13), &dev).unwrap();
        let y = frozen_matmul(x.as_tensor(), &wb).unwrap();
        assert!(max_diff(&y, &x.as_tensor().matmul(&wb).unwrap()) < 1e-5);
    }

    #[test]
    fn causal_attention_is_row_invariant_across_tiles_and_matches_softmax() {
        let (g, rep, seq, len, d) = (2, 3, 20, 50, 64);
        let pos = len - seq;
        let dev = candle_core::Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, g, rep * seq, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, g, len, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, g, len, d), &dev).unwrap();
        let full = causal_attention(&q, &k, &v, seq, 0.125).unwrap();
        let rows = |t: &Tensor| t.to_vec3::<f32>().unwrap_or_default();
        let full4: Vec<Vec<Vec<f32>>> = full.squeeze(0).unwrap().to_vec3().unwrap();
        for i in 0..seq {
            // Query position i alone, after the keys it may see.
            let qi = q.reshape((1, g, rep, seq, d)).unwrap().narrow(3, i, 1).unwrap().reshape((1, g, rep, d)).unwrap().contiguous().unwrap();
            let (ki, vi) = (k.narrow(2, 0, pos + i + 1).unwrap(), v.narrow(2, 0, pos + i + 1).unwrap());
            let one: Vec<Vec<Vec<f32>>> = causal_attention(&qi, &ki, &vi, 1, 0.125).unwrap().squeeze(0).unwrap().to_vec3().unwrap();
            for gi in 0..g {
                for r in 0..rep {
                    assert_eq!(one[gi][r], full4[gi][r * seq + i], "group {gi}, head {r}, position {i}: bitwise the same alone or in a block");
                }
            }
            // Against softmax(q kᵀ) v with candle's ops.
            let att = (qi.matmul(&ki.t().unwrap()).unwrap() * 0.125).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&att).unwrap().matmul(&vi.contiguous().unwrap()).unwrap().squeeze(0).unwrap();
            for (a, b) in rows(&want).iter().flatten().flatten().zip(one.iter().flatten().flatten()) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn the_vector_kernels_compute_bit_for_bit_the_same_in_every_instruction_set() {
        let dev = Device::Cpu;
        let vector: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i >= Isa::Avx2).collect();
        if vector.len() < 2 {
            eprintln!("skipped: this CPU has {:?} only", Isa::supported());
            return;
        }
        let to_vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // k: whole chunks of 16, a half chunk and a tail, a tail alone; n: not a multiple of the
        // AVX-512 tile (4) or of a task (32).
        for k in [576, 45, 77, 64, 13] {
            let w = Tensor::randn(0f32, 1.0, (77, k), &dev).unwrap();
            for m in [1, 2, 3, 5, 16, EXACT_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
                let results: Vec<Vec<f32>> = vector.iter().map(|&isa| to_vec(x.apply_op2_no_bwd(&w, &SmallMMatmul { isa }).unwrap())).collect();
                assert!(results.windows(2).all(|p| p[0] == p[1]), "k = {k}, m = {m}: {vector:?} differ");
            }
        }
        let (g, rows, len, d) = (3, 6, 40, 64);
        let q = Tensor::randn(0f32, 1.0, (1, g, rows, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, g, len, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, g, len, d), &dev).unwrap();
        let results: Vec<Vec<f32>> = vector.iter().map(|&isa| to_vec(q.apply_op3_no_bwd(&k, &v, &CausalAttention { seq: 2, scale: 0.125, tree: None, isa }).unwrap())).collect();
        assert!(results.windows(2).all(|p| p[0] == p[1]), "attention: {vector:?} differ");
    }

    #[test]
    fn small_m_matmul_matches_matmul_and_is_row_invariant() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (77, 45), &dev).unwrap(); // k not a multiple of 8
        let x = Tensor::randn(0f32, 1.0, (1, 9, 45), &dev).unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let got = small_m_matmul(&x, &w).unwrap();
        let d = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
        // Row 4 alone gives bitwise the same result as row 4 inside the block.
        let alone = small_m_matmul(&x.narrow(1, 4, 1).unwrap(), &w).unwrap();
        let inside = got.narrow(1, 4, 1).unwrap();
        assert_eq!(alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(), inside.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // Every block size up to EXACT_ROWS (one or two weight rows at a time, groups of 1 to 4
        // input rows) computes each row as alone.
        let big = Tensor::randn(0f32, 1.0, (1, EXACT_ROWS, 45), &dev).unwrap();
        let alone: Vec<Vec<f32>> = (0..EXACT_ROWS).map(|i| small_m_matmul(&big.narrow(1, i, 1).unwrap(), &w).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
        for m in [2, 3, 5, 7, 13, 33, EXACT_ROWS] {
            let block: Vec<Vec<f32>> = small_m_matmul(&big.narrow(1, 0, m).unwrap(), &w).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
            for (i, row) in block.iter().enumerate() {
                assert_eq!(row, &alone[i], "row {i} of a block of {m}");
            }
        }
        // The scalar path agrees with the vector path to rounding.
        let (xv, wv) = (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let mut out = vec![0f32; 9];
        dots_scalar(&wv[..45], &xv, 45, &mut out);
        let col0: Vec<f32> = got.squeeze(0).unwrap().narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in out.iter().zip(&col0) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}

