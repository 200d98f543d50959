//! Integer dot products of 8-bit weight rows with states rounded to 16 bits (AVX-512 VNNI): the
//! draft path's matmuls ([`crate::model::q8::Q8Matrix::matmul`]) and the head's screen
//! ([`crate::model::screen`]).
//!
//! A state rounded to `r` in `[-32767, 32767]` goes as two unsigned bytes, `hi = (r >> 8) + 128`
//! and `lo = r & 255` (`256 · hi + lo = r + 32768`), and `vpdpbusd` multiplies 64 unsigned bytes
//! by 64 signed weights into sixteen 32-bit sums per instruction: two instructions per 64
//! products of a weight row and a state, where converting the weights to f32 and multiplying in
//! f32 takes twelve (measured on an AMD EPYC, one core: 0.275 ms per decoder layer for one row
//! with the weights in the caches, 12.9 GB/s of weights, compute-bound; `cargo bench --bench
//! engine` part `q8`). The sums are exact integers: per 32-bit lane at most `CHUNK / 16`
//! products of `255 · 127`, shifted by 8 and added, under 2³¹; across lanes and chunks in i64,
//! or, for tiles of many sums, the `hi` and `lo` sums across lanes in 32 bits (under 2²⁷),
//! sixteen accumulators at a time by a transposing tree, then combined in i64.
//!
//! Each output depends only on its weight row and its state, so a block's rows compute exactly
//! as they would alone, and a scalar loop gives the same integers
//! ([`crate::model::q8::Q8Matrix::matmul_q16`] on a CPU without VNNI).

use std::arch::x86_64::*;

/// Columns summed in 32-bit lanes before the lanes go to 64 bits (a multiple of 64).
const CHUNK: usize = 2048;
/// Weight rows per tile.
const TILE_W: usize = 4;
/// How many weight rows ahead each load prefetches (16 rows of 8-bit weights are about the
/// bytes of the f32 kernels' 4, [`super::PREFETCH_ROWS`]).
const PREFETCH_ROWS: usize = 16;
/// States per tile (two accumulators each per weight row: `2 · 4 · 3 + 4 + 2` of 32 registers).
const TILE_X: usize = 3;

/// The sixteen 32-bit lanes of `a`, summed in 64 bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn lanes_i64(a: __m512i) -> i64 {
    let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
    _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi))
}

/// The sum of each vector's sixteen 32-bit lanes, lane `i` of the result holding `v[i]`'s (a
/// transposing tree: 45 instructions for 16 sums, where [`lanes_i64`] takes about 10 for one).
/// Exact while every sum fits in 32 bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn sum_lanes16(v: &[__m512i; 16]) -> __m512i {
    // Pairs: per 128-bit lane [a, b, a, b] of partial sums.
    let mut pairs = [_mm512_setzero_si512(); 8];
    for (i, p) in pairs.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *p = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    }
    // Quads: per 128-bit lane the four vectors' sums over that lane.
    let mut quads = [_mm512_setzero_si512(); 4];
    for (i, q) in quads.iter_mut().enumerate() {
        let (a, b) = (pairs[2 * i], pairs[2 * i + 1]);
        *q = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // Across the 128-bit lanes: (0 + 1, 2 + 3) of two quads, then of those.
    let across = |a: __m512i, b: __m512i| _mm512_add_epi32(_mm512_shuffle_i32x4::<0x88>(a, b), _mm512_shuffle_i32x4::<0xDD>(a, b));
    across(across(quads[0], quads[1]), across(quads[2], quads[3]))
}

/// `sums[r * m + first + g] = Σ_c w[r·k + c] · (256 · hi[s·k + c] + lo[s·k + c])`, `s = first +
/// g`, for `R` weight rows and `G` states.
///
/// # Safety
/// [`super::has_vnni`]; `w` holds `R * k` values, `hi` and `lo` at least `(first + G) * k`, `sums` at
/// least `(R - 1) * m + first + G`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const G: usize>(w: &[i8], hi: &[u8], lo: &[u8], k: usize, first: usize, m: usize, sums: &mut [i64]) {
    let blocks = k / 64;
    let (wp, hp, lp) = (w.as_ptr(), hi.as_ptr().add(first * k), lo.as_ptr().add(first * k));
    let mut total = [[0i64; G]; R];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + CHUNK / 64).min(blocks);
        let mut acc_h = [[_mm512_setzero_si512(); G]; R];
        let mut acc_l = [[_mm512_setzero_si512(); G]; R];
        for b in b0..b1 {
            let mut wv = [_mm512_setzero_si512(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                _mm_prefetch(wp.wrapping_add((r + PREFETCH_ROWS) * k + b * 64), _MM_HINT_T1);
                *v = _mm512_loadu_si512(wp.add(r * k + b * 64) as *const _);
            }
            for g in 0..G {
                let h = _mm512_loadu_si512(hp.add(g * k + b * 64) as *const _);
                let l = _mm512_loadu_si512(lp.add(g * k + b * 64) as *const _);
                for r in 0..R {
                    acc_h[r][g] = _mm512_dpbusd_epi32(acc_h[r][g], h, wv[r]);
                    acc_l[r][g] = _mm512_dpbusd_epi32(acc_l[r][g], l, wv[r]);
                }
            }
        }
        // A lane holds 4 products per block, 128 over a chunk, each at most 255 · 127: |h|,
        // |l| < 2²², the sum of sixteen lanes of either < 2²⁷, and 256 · h + l of a lane fits in
        // 32 bits.
        if 2 * R * G >= 16 {
            // Many sums: the lanes of sixteen accumulators at a time.
            let mut flat = [_mm512_setzero_si512(); 32];
            for r in 0..R {
                for g in 0..G {
                    (flat[2 * (r * G + g)], flat[2 * (r * G + g) + 1]) = (acc_h[r][g], acc_l[r][g]);
                }
            }
            let mut lane_sums = [0i32; 32];
            for c in 0..(2 * R * G).div_ceil(16) {
                let group: &[__m512i; 16] = flat[16 * c..16 * c + 16].try_into().expect("sixteen accumulators");
                _mm512_storeu_si512(lane_sums.as_mut_ptr().add(16 * c) as *mut _, sum_lanes16(group));
            }
            for (r, total) in total.iter_mut().enumerate() {
                for (g, t) in total.iter_mut().enumerate() {
                    let i = 2 * (r * G + g);
                    *t += 256 * lane_sums[i] as i64 + lane_sums[i + 1] as i64;
                }
            }
        } else {
            for r in 0..R {
                for g in 0..G {
                    let both = _mm512_add_epi32(_mm512_slli_epi32(acc_h[r][g], 8), acc_l[r][g]);
                    total[r][g] += lanes_i64(both);
                }
            }
        }
        b0 = b1;
    }
    for (r, t) in total.iter().enumerate() {
        for (g, &t) in t.iter().enumerate() {
            let s = first + g;
            let mut sum = t;
            for c in blocks * 64..k {
                sum += w[r * k + c] as i64 * (256 * hi[s * k + c] as i64 + lo[s * k + c] as i64);
            }
            sums[r * m + s] = sum;
        }
    }
}

/// All `m` states against `R` weight rows, [`TILE_X`] states at a time.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_against_states<const R: usize>(w: &[i8], hi: &[u8], lo: &[u8], k: usize, m: usize, sums: &mut [i64]) {
    let mut first = 0;
    while first < m {
        match m - first {
            1 => tile::<R, 1>(w, hi, lo, k, first, m, sums),
            2 => tile::<R, 2>(w, hi, lo, k, first, m, sums),
            _ => tile::<R, TILE_X>(w, hi, lo, k, first, m, sums),
        }
        first += (m - first).min(TILE_X);
    }
}

/// `sums[r * m + s] = Σ_c w[r·k + c] · (256 · hi[s·k + c] + lo[s·k + c])` for the `rows =
/// sums.len() / m` weight rows in `w` and the `m` states in `hi`, `lo`.
///
/// # Safety
/// [`super::has_vnni`]; `w.len() == rows * k`, `hi.len() == lo.len() == m * k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn dots(w: &[i8], hi: &[u8], lo: &[u8], k: usize, m: usize, sums: &mut [i64]) {
    let rows = sums.len() / m.max(1);
    let mut r = 0;
    while r + TILE_W <= rows {
        rows_against_states::<TILE_W>(&w[r * k..], hi, lo, k, m, &mut sums[r * m..]);
        r += TILE_W;
    }
    for r in r..rows {
        rows_against_states::<1>(&w[r * k..], hi, lo, k, m, &mut sums[r * m..]);
    }
}
