//! The QUIC endpoint: one task per connection, one per session.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::cloud::session::session;
use crate::cloud::CloudConfig;
use crate::error::{Error, Result};
use crate::split::CloudBundle;

pub(crate) struct Shared {
    pub(crate) bundle: Arc<CloudBundle>,
    pub(crate) config: CloudConfig,
    pub(crate) sessions: Arc<tokio::sync::Semaphore>,
    /// Connections open at once (sessions or not): beyond [`connection_limit`] new ones are
    /// refused.
    pub(crate) connections: Arc<tokio::sync::Semaphore>,
    pub(crate) next_session: AtomicU64,
    pub(crate) load: crate::cloud::load::LoadMeter,
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
        Ok(Self {
            endpoint,
            fingerprint: identity.fingerprint(),
            shared: Arc::new(Shared {
                sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
                connections: Arc::new(tokio::sync::Semaphore::new(connection_limit(config.max_sessions))),
                bundle,
                config,
                next_session: AtomicU64::new(1),
                load: Default::default(),
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

    /// A handle that stops the server.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Serves until the endpoint is closed.
    pub async fn serve(self) -> Result<()> {
        while let Some(incoming) = self.endpoint.accept().await {
            let shared = self.shared.clone();
            let remote = incoming.remote_address();
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
