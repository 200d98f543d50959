//! Helpers the benchmarks share: settings from the environment, medians.

/// `$key` parsed as a `T`, else `default` (unset or unparsable).
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub use crate::util::stats::median;
