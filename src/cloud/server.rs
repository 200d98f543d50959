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

pub(crate) fn log(msg: impl std::fmt::Display) {
    eprintln!("hat-cloud: {msg}");
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
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => handle_connection(shared, conn).await,
                    Err(e) => log(format!("{remote}: handshake failed: {e}")),
                }
            });
        }
        Ok(())
    }
}

async fn handle_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(shared, send, recv, remote).await {
                        log(format!("{remote}: {e}"));
                    }
                });
            }
            Err(_) => return, // connection closed
        }
    }
}

