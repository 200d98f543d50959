//! AVX-512 versions of the exact kernels, **bitwise equal** to the AVX2 ones.
//!
//! The AVX2 dot product keeps two 8-lane accumulators over chunks of 16 (elements `16c + l` in
//! lane `l` of the first, `16c + 8 + l` in lane `l` of the second), adds a last half chunk of 8
//! into the first, sums the pair lane by lane, then the eight lanes in a fixed tree, then the
//! tail by scalar FMA. One 16-lane accumulator over the same chunks holds exactly those two
//! (its low half is the first, its high half the second), a masked FMA adds the half chunk to
//! the low half alone, and the same reduction follows: every output is bit for bit what the
//! AVX2 kernel computes. The gain is throughput where many rows share the weights (a packed
//! pass over many sessions is compute-bound): half the FMA instructions, and with 32 vector
//! registers four weight rows by six input rows per tile instead of two by three.

use std::arch::x86_64::*;

use super::{sum_lanes8, sum_pair, Weight, KEY_BLOCK, PREFETCH_ROWS};

/// Weight rows per tile.
const TILE_W: usize = 4;
/// Input rows per tile.
const TILE_X: usize = 6;

/// Whether the CPU has what these kernels use.
pub(crate) fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The low and high eight lanes of `a`, summed as [`sum_pair`] sums an AVX2 pair.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn reduce(a: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(a);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    sum_pair(lo, hi)
}

/// Dot products of `R` weight rows (`w`: `R * k`, contiguous) with `G` input rows of `x`
/// starting at row `first`, into `block[r * m + first + g]` (`block`: `(rows, m)`, weight-row
/// major).
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA ([`available`]); `w` holds `R * k` values, `x` at least
/// `(first + G) * k`, `block` at least `(R - 1) * m + first + G`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile<W: Weight, const R: usize, const G: usize>(w: &[W], x: &[f32], k: usize, first: usize, m: usize, block: &mut [f32]) {
    let chunks = k / 16;
    let (wp, xp) = (w.as_ptr(), x.as_ptr().add(first * k));
    let mut acc = [[_mm512_setzero_ps(); R]; G];
    let mut wv = [_mm512_setzero_ps(); R];
    for c in 0..chunks {
        for (r, v) in wv.iter_mut().enumerate() {
            if c % W::CHUNKS_PER_LINE == 0 {
                // The rows a few on, into the cache ahead of their loads (as the AVX2 kernels do).
                _mm_prefetch(wp.wrapping_add((r + PREFETCH_ROWS) * k + c * 16) as *const i8, _MM_HINT_T1);
            }
            *v = W::load16_avx512(wp.add(r * k + c * 16));
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(xp.add(g * k + c * 16));
            for (a, v) in a.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(*v, xv, *a);
            }
        }
    }
    let half = W::HALF_CHUNK && k - chunks * 16 >= 8;
    if half {
        // The half chunk into the low eight lanes only (the AVX2 kernel's first accumulator).
        const LOW: __mmask16 = 0x00ff;
        for (r, v) in wv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(LOW, wp.add(r * k + chunks * 16) as *const f32);
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(LOW, xp.add(g * k + chunks * 16));
            for (a, v) in a.iter_mut().zip(&wv) {
                *a = _mm512_mask3_fmadd_ps(*v, xv, *a, LOW);
            }
        }
    }
    let tail = chunks * 16 + if half { 8 } else { 0 };
    for (g, a) in acc.iter().enumerate() {
        let xr = &x[(first + g) * k..(first + g + 1) * k];
        for (r, a) in a.iter().enumerate() {
            let wr = &w[r * k..(r + 1) * k];
            let mut sum = reduce(*a);
            for j in tail..k {
                sum = W::tail(sum, wr[j], xr[j]);
            }
            block[r * m + first + g] = sum;
        }
    }
}

/// Input rows `first..first + G` against every weight row in `w`, [`TILE_W`] at a time.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn group_against_rows<W: Weight, const G: usize>(w: &[W], x: &[f32], k: usize, first: usize, m: usize, block: &mut [f32]) {
    let rows = block.len() / m;
    let mut r = 0;
    while r + TILE_W <= rows {
        tile::<W, TILE_W, G>(&w[r * k..], x, k, first, m, &mut block[r * m..]);
        r += TILE_W;
    }
    for r in r..rows {
        tile::<W, 1, G>(&w[r * k..], x, k, first, m, &mut block[r * m..]);
    }
}

/// `block[r * m + i] = w_r · x_i` for the `rows = block.len() / m` weight rows in `w`
/// (`rows * k`) and the `m` input rows in `x` (`m * k`); i8 weights unscaled.
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA ([`available`]); `w.len() == rows * k`, `x.len() == m * k`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn dots<W: Weight>(w: &[W], x: &[f32], k: usize, m: usize, block: &mut [f32]) {
    let mut first = 0;
    while first < m {
        match m - first {
            1 => group_against_rows::<W, 1>(w, x, k, first, m, block),
            2 => group_against_rows::<W, 2>(w, x, k, first, m, block),
            3 => group_against_rows::<W, 3>(w, x, k, first, m, block),
            4 => group_against_rows::<W, 4>(w, x, k, first, m, block),
            5 => group_against_rows::<W, 5>(w, x, k, first, m, block),
            _ => group_against_rows::<W, TILE_X>(w, x, k, first, m, block),
        }
        first += (m - first).min(TILE_X);
    }
}

/// `a · b` as the AVX2 `dot_avx2` computes it (attention's scores).
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA ([`available`]).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let chunks = n / 16;
    for c in 0..chunks {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(c * 16)), _mm512_loadu_ps(pb.add(c * 16)), acc);
    }
    let mut sum = reduce(acc);
    for j in chunks * 16..n {
        sum = a[j].mul_add(b[j], sum);
    }
    sum
}

/// `a · keys[i]` for [`KEY_BLOCK`] keys, each exactly as [`dot`] (and the AVX2 `dot_avx2`)
/// computes it.
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA ([`available`]).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn dots_keys(a: &[f32], keys: [&[f32]; KEY_BLOCK]) -> [f32; KEY_BLOCK] {
    let n = keys.iter().map(|k| k.len()).fold(a.len(), usize::min);
    let chunks = n / 16;
    let pa = a.as_ptr();
    let halves = keys.map(|b| {
        let pb = b.as_ptr();
        let mut acc = _mm512_setzero_ps();
        for c in 0..chunks {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(c * 16)), _mm512_loadu_ps(pb.add(c * 16)), acc);
        }
        _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)))
    });
    let mut sums = sum_lanes8(halves);
    for (s, b) in sums.iter_mut().zip(keys) {
        for j in chunks * 16..n {
            *s = a[j].mul_add(b[j], *s);
        }
    }
    sums
}
