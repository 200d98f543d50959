//! The exact small-m matmul over 4-bit affine blocks ([`crate::model::q4::PackedQ4`]), AVX-512:
//! **bit for bit** what [`super::avx512`]'s f32 kernel computes from the decoded f32 weights,
//! reading about a fifth of the bytes.
//!
//! A block of 32 weights is `w = q · d + m` (`q` in 0..16, rounded once for the product and once
//! for the sum: what decoding a GGUF Q4_1 block gives). Its sixteen possible values are one
//! 16-lane register (`iota · d + m`, the same two roundings), and `vpermps` picks each weight's
//! value by its 4-bit index: the low nibbles are the block's first sixteen weights, the high
//! nibbles the next sixteen (`vpermps` reads only the low four bits of each index, so the low
//! nibbles need no mask). Each decoded chunk of sixteen then goes into the same 16-lane
//! accumulator, by the same fused multiply-add, in the same chunk order, reduced the same way,
//! as in the f32 kernel: the same bits, whatever the tile or the number of input rows.
//!
//! A decode step reads the weights once (memory-bound: the f32 kernel reads 2,304 bytes per
//! weight row of 576, this one 432); for several input rows each decoded chunk serves them all.

use std::arch::x86_64::*;

use super::avx512::reduce;

/// Bytes of 4-bit indices per block of 32 weights.
pub(crate) const BLOCK_BYTES: usize = 16;
/// Weights per block.
pub(crate) const BLOCK: usize = 32;
/// Weight rows ahead whose indices and scales are prefetched into L2 (~3.5 KB at 576 columns).
const PREFETCH_ROWS: usize = 8;
/// Input rows per tile at most.
const TILE_X: usize = 6;

/// `block[r * m + i] = w_{row0 + r} · x_i` for the `rows = block.len() / m` weight rows from
/// `row0` of the packed matrix (`qs`: 16 bytes per block, `dm`: `[d, m]` per block, `k / 32`
/// blocks per row) and the `m` input rows in `x` (`m * k`).
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA ([`super::avx512::available`]); `k` is a multiple of 32;
/// `qs` and `dm` hold at least `row0 + rows` rows; `x.len() >= m * k`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn dots(qs: &[u8], dm: &[[f32; 2]], row0: usize, x: &[f32], k: usize, m: usize, block: &mut [f32]) {
    let mut first = 0;
    while first < m {
        let view = Tile { qs, dm, x, k, first, m };
        match m - first {
            1 => view.rows::<1, 4>(row0, block),
            2 => view.rows::<2, 4>(row0, block),
            3 => view.rows::<3, 4>(row0, block),
            4 => view.rows::<4, 2>(row0, block),
            5 => view.rows::<5, 2>(row0, block),
            _ => view.rows::<TILE_X, 2>(row0, block),
        }
        first += (m - first).min(TILE_X);
    }
}

/// Input rows `first..first + G` of `x` against the packed weight rows.
struct Tile<'a> {
    qs: &'a [u8],
    dm: &'a [[f32; 2]],
    x: &'a [f32],
    k: usize,
    first: usize,
    m: usize,
}

impl Tile<'_> {
    /// Every weight row of `block` (from `row0`), `R` at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn rows<const G: usize, const R: usize>(&self, row0: usize, block: &mut [f32]) {
        let rows = block.len() / self.m;
        let mut r = 0;
        while r + R <= rows {
            self.tile::<G, R>(row0 + r, &mut block[r * self.m..]);
            r += R;
        }
        for r in r..rows {
            self.tile::<G, 1>(row0 + r, &mut block[r * self.m..]);
        }
    }

    /// Weight rows `row..row + R` against input rows `first..first + G`, into `block[r * m +
    /// first + g]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<const G: usize, const R: usize>(&self, row: usize, block: &mut [f32]) {
        let (k, nb) = (self.k, self.k / BLOCK);
        let iota = _mm512_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0);
        let (qp, dp) = (self.qs.as_ptr(), self.dm.as_ptr());
        let xp = self.x.as_ptr().add(self.first * k);
        let mut acc = [[_mm512_setzero_ps(); R]; G];
        let mut low = [_mm512_setzero_ps(); R];
        let mut high = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            for r in 0..R {
                let at = (row + r) * nb + b;
                let ahead = at + PREFETCH_ROWS * nb;
                if b % 4 == 0 {
                    _mm_prefetch(qp.wrapping_add(ahead * BLOCK_BYTES) as *const i8, _MM_HINT_T1);
                }
                if b % 8 == 0 {
                    _mm_prefetch(dp.wrapping_add(ahead) as *const i8, _MM_HINT_T1);
                }
                let [d, mn] = *dp.add(at);
                let values = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(d)), _mm512_set1_ps(mn));
                let index = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(at * BLOCK_BYTES) as *const __m128i));
                low[r] = _mm512_permutexvar_ps(index, values);
                high[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(index), values);
            }
            for (g, a) in acc.iter_mut().enumerate() {
                let x0 = _mm512_loadu_ps(xp.add(g * k + b * BLOCK));
                let x1 = _mm512_loadu_ps(xp.add(g * k + b * BLOCK + 16));
                for (r, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(low[r], x0, *a);
                    *a = _mm512_fmadd_ps(high[r], x1, *a);
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            for (r, a) in a.iter().enumerate() {
                block[r * self.m + self.first + g] = reduce(*a);
            }
        }
    }
}
