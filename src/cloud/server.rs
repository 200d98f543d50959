//! The QUIC endpoint: one task per connection, one per session.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::cloud::session::session;
use crate::cloud::CloudConfig;
use crate::error::{Error, Result};
use crate::split::CloudBundle;

/// Wrong tokens an address may send before its connections are refused for a while.
pub const FREE_BAD_TOKENS: u32 = 3;
/// The longest an address is shut out for wrong tokens (the time doubles with each one past
/// [`FREE_BAD_TOKENS`], from one second).
pub const MAX_PENALTY: std::time::Duration = std::time::Duration::from_secs(60);

/// Addresses that sent wrong tokens: how many, and until when their connections are refused.
#[derive(Default)]
pub(crate) struct Penalties(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>);

impl Penalties {
    /// How long `ip` is still shut out, if it is.
    pub(crate) fn shut_out(&self, ip: std::net::IpAddr) -> Option<std::time::Duration> {
        let map = self.0.lock().ok()?;
        let (_, until) = map.get(&ip)?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts a wrong token from `ip`; returns the penalty it earned, if any.
    pub(crate) fn failed(&self, ip: std::net::IpAddr) -> Option<std::time::Duration> {
        let mut map = self.0.lock().ok()?;
        let now = std::time::Instant::now();
        if map.len() > 10_000 {
            // Bounded: forget addresses whose penalty is over.
            map.retain(|_, (_, until)| *until > now);
        }
        let entry = map.entry(ip).or_insert((0, now));
        entry.0 += 1;
        let over = entry.0.checked_sub(FREE_BAD_TOKENS).filter(|&n| n > 0)?;
        let penalty = std::time::Duration::from_secs(1u64 << (over - 1).min(6)).min(MAX_PENALTY);
        entry.1 = now + penalty;
        Some(penalty)
    }

    /// A right token from `ip`: its count starts over.
    pub(crate) fn passed(&self, ip: std::net::IpAddr) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&ip);
        }
    }
}

pub(crate) struct Shared {
    pub(crate) bundle: Arc<CloudBundle>,
    pub(crate) config: CloudConfig,
    pub(crate) sessions: Arc<tokio::sync::Semaphore>,
    /// Connections open at once (sessions or not): beyond [`connection_limit`] new ones are
    /// refused.
    pub(crate) connections: Arc<tokio::sync::Semaphore>,
    pub(crate) next_session: AtomicU64,
    pub(crate) load: Arc<crate::cloud::load::LoadMeter>,
    pub(crate) metrics: Arc<crate::cloud::metrics::CloudMetrics>,
    pub(crate) penalties: Penalties,
    /// The passes running now (whether the cloud's compute is advancing, for pending notices).
    pub(crate) passes: Arc<crate::cloud::pending::PassClock>,
    /// The batch scheduler, when batching is on.
    pub(crate) batcher: Option<crate::cloud::batch::Batcher>,
}

impl Shared {
    /// The load the other sessions put on the cloud, as `session` sees it (sessions open from
    /// the session limit's free permits).
    pub(crate) fn load(&self, session: u64) -> crate::net::protocol::CloudLoad {
        self.load.load(self.config.max_sessions - self.sessions.available_permits(), session)
    }
}

/// A bound server: its address and certificate fingerprint are known before it serves.
pub struct CloudServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: String,
    /// The metrics listener, bound with the endpoint, served with it.
    metrics_listener: Option<std::net::TcpListener>,
}

/// Connections the server keeps open at once: every session's, and as many again plus 16 for
/// peers still shaking hands (each of those has [`CloudConfig::handshake_timeout`] to open a
/// session or be closed).
pub fn connection_limit(max_sessions: usize) -> usize {
    2 * max_sessions + 16
}

pub(crate) fn log(msg: impl std::fmt::Display) {
    // Not eprintln!: a closed stderr must not take a session down with a panic.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "hat-cloud: {msg}");
}

impl CloudServer {
    /// Binds the endpoint (must be called inside a tokio runtime).
    pub fn bind(bundle: Arc<CloudBundle>, config: CloudConfig) -> Result<Self> {
        if config.max_sessions == 0 {
            return Err(Error::invalid("--max-sessions must be at least 1"));
        }
        let identity = crate::net::tls::load_or_create_identity(&config.state_dir)?;
        let tls = crate::net::tls::server_config(&identity)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| Error::invalid(format!("TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(crate::net::transport_config()));
        let endpoint = quinn::Endpoint::server(server, config.listen)
            .map_err(|e| Error::invalid(format!("cannot listen on {}: {e}", config.listen)))?;
        let max_context = config.max_context.min(bundle.middle.max_positions());
        let config = CloudConfig { max_context, ..config };
        let metrics_listener = match config.metrics {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| Error::invalid(format!("cannot serve metrics on {addr}: {e}")))?;
                l.set_nonblocking(true).map_err(|e| Error::io(addr.to_string(), e))?;
                Some(l)
            }
            None => None,
        };
        let metrics: Arc<crate::cloud::metrics::CloudMetrics> = Default::default();
        let load: Arc<crate::cloud::load::LoadMeter> = Default::default();
        let passes: Arc<crate::cloud::pending::PassClock> = Default::default();
        let batcher = match config.batching {
            true => Some(crate::cloud::batch::Batcher::start(bundle.clone(), metrics.clone(), load.clone(), passes.clone(), &config)?),
            false => None,
        };
        Ok(Self {
            endpoint,
            metrics_listener,
            fingerprint: identity.fingerprint(),
            shared: Arc::new(Shared {
                sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
                connections: Arc::new(tokio::sync::Semaphore::new(connection_limit(config.max_sessions))),
                bundle,
                config,
                next_session: AtomicU64::new(1),
                load,
                metrics,
                penalties: Default::default(),
                passes,
                batcher,
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|e| Error::invalid(format!("no local address: {e}")))
    }

    /// `sha256:<hex>` of the server's certificate, for edges to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Where the metrics are served (`http://ADDR/metrics`), if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<crate::cloud::metrics::CloudMetrics> {
        self.shared.metrics.clone()
    }

    /// A handle that stops the server.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Serves until the endpoint is closed.
    pub async fn serve(mut self) -> Result<()> {
        if let Some(l) = self.metrics_listener.take() {
            let listener = tokio::net::TcpListener::from_std(l).map_err(|e| Error::invalid(format!("metrics listener: {e}")))?;
            let metrics = self.shared.metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::cloud::metrics::serve(metrics, listener).await {
                    log(e);
                }
            });
        }
        while let Some(incoming) = self.endpoint.accept().await {
            let shared = self.shared.clone();
            let remote = incoming.remote_address();
            // An address that keeps sending wrong tokens is shut out for a while.
            if let Some(left) = shared.penalties.shut_out(remote.ip()) {
                log(format!("{remote}: refused: wrong tokens from this address, {:.0} s to wait", left.as_secs_f64()));
                incoming.refuse();
                continue;
            }
            // Too many connections at once (most of them, then, peers that never open a session):
            // refuse new ones until some close.
            let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                log(format!("{remote}: refused: {} connections open", connection_limit(shared.config.max_sessions)));
                incoming.refuse();
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let handshake = tokio::time::timeout(shared.config.handshake_timeout, incoming);
                match handshake.await {
                    Ok(Ok(conn)) => handle_connection(shared, conn).await,
                    Ok(Err(e)) => log(format!("{remote}: handshake failed: {e}")),
                    Err(_) => log(format!("{remote}: no TLS handshake within {:?}", shared.config.handshake_timeout)),
                }
            });
        }
        Ok(())
    }
}

/// One session per connection: it must open its stream within the handshake deadline (or it
/// is closed: it would otherwise hold a connection for as long as its keep-alives run), and the
/// connection closes when the session ends, however it ends.
async fn handle_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let (send, recv) = match tokio::time::timeout(shared.config.handshake_timeout, conn.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return,
        Err(_) => {
            log(format!("{remote}: no session opened within {:?}: connection closed", shared.config.handshake_timeout));
            conn.close(quinn::VarInt::from_u32(1), b"no session opened");
            return;
        }
    };
    if let Err(e) = session(shared, send, recv, remote).await {
        log(format!("{remote}: {e}"));
    }
    // Let the last frames (the error frame of a refusal) reach the edge before closing.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(0), b"session ended");
}
