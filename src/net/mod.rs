//! Everything that crosses the network, and nothing that computes a role's work:
//!
//! - [`protocol`]: the wire format (length-prefixed frames, hidden-state blocks, error codes);
//! - [`tls`]: the cloud's self-signed identity and the edge's pinning;
//! - [`transport`]: the QUIC transport settings both ends use;
//! - [`link`]: the device's view of the cloud ([`MiddleLink`]), byte counts, frame taps;
//! - [`client`]: [`QuicLink`], the edge's QUIC session (and its link probes);
//! - [`resilient`]: [`ResilientLink`], a session that reconnects and replays when the cloud is lost;
//! - [`local`]: [`LocalMiddle`], the middle layers in-process (tests, training);
//! - [`emulation`]: link rates and round-trip delay emulated on the edge's side;
//! - [`noise`]: noise on the uplink ([`NoisyUplink`]), a privacy defence that changes outputs.
//!
//! May use [`crate::model`] (the in-process link runs a layer stack), [`crate::sched`] (the
//! cost model and link estimate the handshake and probes carry) and [`crate::util`]; never
//! `edge` or `cloud`.

pub mod client;
pub mod emulation;
pub mod link;
pub mod local;
pub mod noise;
pub mod protocol;
pub mod resilient;
pub mod tls;
pub mod transport;

pub use client::{ConnectOptions, QuicLink, CONNECT_TIMEOUT};
pub use emulation::LinkEmulation;
pub use link::{Direction, FrameTap, LinkStats, MiddleLink, MiddleReply};
pub use local::LocalMiddle;
pub use noise::NoisyUplink;
pub use resilient::ResilientLink;
pub use transport::transport_config;
