//! How many threads compute: one setting (`--threads`) for every pool that does, set once at
//! start-up before any of them exists.
//!
//! Pools bounded: rayon's global pool (hat's kernels), candle's CPU matmuls (gemm, which reads
//! `RAYON_NUM_THREADS`), and the tokio runtimes the commands build ([`count`] as their worker
//! count). With `--threads 1` and `taskset -c N` a process computes on one core, as one
//! machine of a two-machine set-up would.

use std::sync::OnceLock;

use crate::error::{Error, Result};

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the compute threads (`None`: every core). Call once, first thing, from the one thread
/// running; later calls fail.
pub fn configure(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => return Err(Error::invalid("--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    THREADS.set(n).map_err(|_| Error::invalid("the thread count is already set"))?;
    // candle's CPU backend reads this on every matmul; no other thread exists yet.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::invalid(format!("cannot size the compute thread pool: {e}")))?;
    Ok(n)
}

/// The configured compute threads (every core when [`configure`] was not called).
pub fn count() -> usize {
    *THREADS.get().unwrap_or(&std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f` on a thread of the compute pool (rayon's global pool), so that every parallel loop
/// of the kernels inside it starts there. Called from a thread outside the pool, each such loop
/// hands its work to the pool and sleeps until it is done: a wake-up and a sleep per matmul,
/// ~30 µs each with one compute thread (measured: 0.31 → 0.20 ms per decoder layer of 8-bit
/// draft compute, `cargo bench --bench engine` part `q8`), hundreds of times per token. Inside
/// the pool they run in place.
///
/// `f` holds a pool thread until it returns, and a thread of the pool waiting on its own
/// parallel loop may pick up another `in_pool` job meanwhile: use it for compute, or for one
/// generation per process (`run-edge`), not for many generations that wait on the network side
/// by side (the edge service runs those outside the pool).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
