//! Small helpers every layer may use: content hashes, progress bars, allocator settings, the
//! compute thread count, medians. They
//! import nothing from the rest of hat but its error type.

pub mod digest;
pub mod linalg;
pub mod memory;
pub mod progress;
pub mod stats;
pub mod svg;
pub mod threads;
