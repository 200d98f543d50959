//! `hat serve-cloud`: the middle submodel behind a QUIC endpoint.
//!
//! One task per connection; each session (one bidirectional stream) owns its middle-layer KV
//! cache, freed when the session ends or idles out. Model compute runs on tokio's blocking pool,
//! never on the async threads. A malformed or refused request gets an error frame and a log line
//! and ends that session only; the server keeps serving every other one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::protocol::{read_frame, write_frame, ErrorCode, HiddenBlock, Message, MAX_FRAME, PROTOCOL_VERSION};
use crate::split::CloudBundle;

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
}

struct Shared {
    bundle: Arc<CloudBundle>,
    config: CloudConfig,
    sessions: Arc<tokio::sync::Semaphore>,
    next_session: AtomicU64,
}

/// A bound server: its address and certificate fingerprint are known before it serves.
pub struct CloudServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: String,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("hat-cloud: {msg}");
}

impl CloudServer {
    /// Binds the endpoint (must be called inside a tokio runtime).
    pub fn bind(bundle: Arc<CloudBundle>, config: CloudConfig) -> Result<Self> {
        if config.max_sessions == 0 {
            return Err(Error::invalid("--max-sessions must be at least 1"));
        }
        let identity = crate::tls::load_or_create_identity(&config.state_dir)?;
        let tls = crate::tls::server_config(&identity)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| Error::invalid(format!("TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(crate::link::transport_config()));
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

/// Sends an error frame, logs it and ends the session.
async fn refuse(send: &mut quinn::SendStream, code: ErrorCode, message: String) -> Result<()> {
    let _ = write_frame(send, &Message::Error { code, message: message.clone() }.encode()).await;
    let _ = send.finish();
    Err(Error::invalid(format!("refused ({code:?}): {message}")))
}

async fn session(shared: Arc<Shared>, mut send: quinn::SendStream, mut recv: quinn::RecvStream, remote: SocketAddr) -> Result<()> {
    let cfg = &shared.config;
    let manifest = &shared.bundle.manifest;
    let hello = match tokio::time::timeout(cfg.idle_timeout, read_frame(&mut recv, 64 << 10)).await {
        Ok(Ok(Some(body))) => Message::decode(&body),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => return refuse(&mut send, ErrorCode::IdleTimeout, "no handshake".into()).await,
    };
    let (dtype, hidden) = match hello {
        Ok(Message::Hello { version, split_id, token, hidden_size, dtype }) => {
            if version != PROTOCOL_VERSION {
                return refuse(&mut send, ErrorCode::VersionMismatch, format!("protocol version {version}, this cloud speaks {PROTOCOL_VERSION}")).await;
            }
            if let Some(want) = &cfg.token {
                if &token != want {
                    return refuse(&mut send, ErrorCode::Unauthorized, "wrong or missing token".into()).await;
                }
            }
            if split_id != manifest.split_id {
                return refuse(
                    &mut send,
                    ErrorCode::SplitMismatch,
                    format!("the device bundle is split {split_id}, this cloud serves split {} ({})", manifest.split_id, manifest.source.name),
                )
                .await;
            }
            if hidden_size as usize != manifest.hidden_size {
                return refuse(&mut send, ErrorCode::BadRequest, format!("hidden size {hidden_size}, the model's is {}", manifest.hidden_size)).await;
            }
            (dtype, hidden_size as usize)
        }
        Ok(other) => return refuse(&mut send, ErrorCode::BadRequest, format!("expected a handshake, got {other:?}")).await,
        Err(e) => return refuse(&mut send, ErrorCode::BadRequest, e.to_string()).await,
    };
    let Ok(_permit) = shared.sessions.clone().try_acquire_owned() else {
        return refuse(&mut send, ErrorCode::Busy, format!("the cloud already serves its maximum of {} sessions", cfg.max_sessions)).await;
    };
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let range = manifest.plan.middle_range();
    let welcome = Message::Welcome { session: id, max_context: cfg.max_context as u32, middle_start: range.start as u32, middle_end: range.end as u32 };
    write_frame(&mut send, &welcome.encode()).await?;
    log(format!("session {id} from {remote}: open ({} on the wire)", dtype.name()));

    let bundle = shared.bundle.clone();
    let mut cache = Some(bundle.middle.new_cache());
    let max_frame = MAX_FRAME.min(cfg.max_context * hidden * 4 + 64);
    let (mut blocks, started) = (0u64, Instant::now());
    loop {
        let body = match tokio::time::timeout(cfg.idle_timeout, read_frame(&mut recv, max_frame)).await {
            Err(_) => return refuse(&mut send, ErrorCode::IdleTimeout, format!("session {id} idle for {:?}", cfg.idle_timeout)).await,
            Ok(Ok(None)) => break,
            Ok(Ok(Some(b))) => b,
            Ok(Err(e)) => return refuse(&mut send, ErrorCode::BadRequest, e.to_string()).await,
        };
        let block = match Message::decode(&body) {
            Ok(Message::Hidden(b)) => b,
            Ok(Message::Close) => break,
            Ok(other) => return refuse(&mut send, ErrorCode::BadRequest, format!("unexpected {other:?}")).await,
            Err(e) => return refuse(&mut send, ErrorCode::BadRequest, e.to_string()).await,
        };
        let held = cache.as_ref().map_or(0, |c| c.len());
        let (start, count) = (block.start as usize, block.count as usize);
        if let Err(e) = block.check(hidden, dtype) {
            return refuse(&mut send, ErrorCode::BadRequest, e.to_string()).await;
        }
        if start > held {
            return refuse(&mut send, ErrorCode::BadRequest, format!("block starts at position {start} but only {held} are cached")).await;
        }
        if start + count > cfg.max_context {
            return refuse(&mut send, ErrorCode::ContextTooLong, format!("{} positions exceed this cloud's limit of {}", start + count, cfg.max_context)).await;
        }
        let mut c = cache.take().ok_or_else(|| Error::invalid("cache lost"))?;
        let bundle = bundle.clone();
        let computed = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = (|| {
                let x = block.to_tensor(hidden, &candle_core::Device::Cpu)?;
                c.truncate(start);
                let y = bundle.middle.forward(&x, start, &mut c)?;
                HiddenBlock::from_tensor(&y, start, dtype)
            })();
            (c, out, t.elapsed())
        })
        .await
        .map_err(|e| Error::invalid(format!("compute task failed: {e}")))?;
        let (c, out, took) = computed;
        cache = Some(c);
        match out {
            Ok(block) => {
                let msg = Message::Middle { block, compute_us: took.as_micros() as u64 };
                write_frame(&mut send, &msg.encode()).await?;
                blocks += 1;
            }
            Err(e) => return refuse(&mut send, ErrorCode::Internal, e.to_string()).await,
        }
    }
    let _ = send.finish();
    log(format!("session {id}: closed after {blocks} blocks, {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// A server running on its own thread and runtime (tests, benchmarks, embedding).
pub struct BackgroundServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    endpoint: quinn::Endpoint,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    /// Binds and starts serving; returns once the address and fingerprint are known.
    pub fn start(bundle: Arc<CloudBundle>, config: CloudConfig) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("hat-cloud".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(Error::invalid(format!("cannot start a runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let server = match CloudServer::bind(bundle, config) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let info = server.local_addr().map(|a| (a, server.fingerprint().to_string(), server.endpoint()));
                    let _ = tx.send(info);
                    let _ = server.serve().await;
                });
            })
            .map_err(|e| Error::invalid(format!("cannot start the server thread: {e}")))?;
        let (addr, fingerprint, endpoint) = rx.recv().map_err(|_| Error::invalid("the server thread died"))??;
        Ok(Self { addr, fingerprint, endpoint, thread: Some(thread) })
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"server stopping");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
