//! Epoch batches: shuffled, then sorted by length within pools, so batches need little padding.


use rand::seq::SliceRandom;
use rand::SeedableRng;



/// Batches drawn together into a pool whose sequences are sorted by length (see [`epoch_batches`]).
pub(crate) const LENGTH_POOL: usize = 32;

/// The batches of one epoch, as indices into the samples (of `lengths` tokens each): a shuffle
/// seeded by `(seed, epoch)`, cut into pools of [`LENGTH_POOL`] batches, each pool sorted by length
/// and cut into batches (so a batch's sequences have about the same length and little padding),
/// and the batches shuffled. `lengths.len().div_ceil(batch)` batches; every sample once.
pub fn epoch_batches(lengths: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let batch = batch.max(1);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch));
    for pool in order.chunks_mut(batch * LENGTH_POOL) {
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

