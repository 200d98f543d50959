//! `hat serve-cloud`: the middle submodel behind a QUIC endpoint.
//!
//! One task per connection; each session (one bidirectional stream) owns its middle-layer KV
//! cache, freed when the session ends or idles out. Model compute never runs on the async
//! threads: by default the blocks every session has waiting go through the middle layers
//! together, packed in one pass (`batch`); with batching off, each block runs on tokio's
//! blocking pool on its own. A malformed or refused request gets an error frame and a log line
//! and ends that session only; the server keeps serving every other one.
//!
//! Files: [`server`] (the endpoint and its connections), `session` (one edge's session: the
//! handshake, limits, compute, probes), `pending` (telling an edge its block is still queued, while
//! the cloud's passes advance), [`load`] (how busy the cloud has been, sent with every
//! reply), [`metrics`] (Prometheus text on `--metrics ADDR`), [`background`] (a server on its own
//! thread).
//!
//! May use [`crate::net`], [`crate::split`], [`crate::sched`], [`crate::model`] and [`crate::util`]; never `edge`
//! or `train`.

pub mod background;
mod batch;
pub mod load;
pub mod metrics;
mod pending;
pub mod server;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use background::BackgroundServer;
pub use server::{connection_limit, CloudServer};

/// How long a peer has by default to finish the TLS handshake, open its stream and say hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Server settings.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub listen: SocketAddr,
    /// Keeps the certificate and key across restarts.
    pub state_dir: PathBuf,
    /// Required from every edge when set.
    pub token: Option<String>,
    pub max_sessions: usize,
    /// Most positions one session may hold.
    pub max_context: usize,
    /// A session that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A peer must finish the TLS handshake, open its stream and send its hello within this long.
    pub handshake_timeout: Duration,
    /// A frame the edge does not take within this long (it stopped reading, or gives no stream
    /// credit) ends its session, which frees its slot and its cache.
    pub write_timeout: Duration,
    /// The middle layers' cost model, told to every edge in the handshake (from `hat profile`
    /// or measured at start).
    pub cost: crate::sched::CloudModel,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Whether the sessions' blocks share passes through the middle layers.
    pub batching: bool,
    /// Most positions in one packed pass (at most [`crate::model::kernels::EXACT_ROWS`]).
    pub batch_rows: usize,
    /// Tests: every pass sleeps this long before it computes (a cloud under load, or stuck).
    #[doc(hidden)]
    pub pass_delay: Duration,
}

