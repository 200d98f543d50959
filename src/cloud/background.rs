//! [`BackgroundServer`]: a cloud serving on its own thread and runtime (tests, benchmarks,
//! embedding).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cloud::{CloudConfig, CloudServer};
use crate::error::{Error, Result};
use crate::split::CloudBundle;

/// A server running on its own thread and runtime (tests, benchmarks, embedding).
pub struct BackgroundServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    /// Where its metrics are served, when the config asked for them.
    pub metrics_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    thread: Option<std::thread::JoinHandle<()>>,
    crash: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BackgroundServer {
    /// Binds and starts serving; returns once the address and fingerprint are known.
    pub fn start(bundle: Arc<CloudBundle>, config: CloudConfig) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
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
                let crashed = rt.block_on(async move {
                    let server = match CloudServer::bind(bundle, config) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return false;
                        }
                    };
                    let info = server.local_addr().map(|a| (a, server.fingerprint().to_string(), server.endpoint(), server.metrics_addr()));
                    let _ = tx.send(info);
                    let crash = async {
                        if crash_rx.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        _ = server.serve() => false,
                        () = crash => true,
                    }
                });
                if crashed {
                    // Every task stops where it is: nothing more is sent, not even a close.
                    rt.shutdown_background();
                }
            })
            .map_err(|e| Error::invalid(format!("cannot start the server thread: {e}")))?;
        let (addr, fingerprint, endpoint, metrics_addr) = rx.recv().map_err(|_| Error::invalid("the server thread died"))??;
        Ok(Self { addr, fingerprint, metrics_addr, endpoint, thread: Some(thread), crash: Some(crash_tx) })
    }

    /// Stops dead, as a frozen or stuck process would: every task stops where it is, nothing
    /// more is sent (not even a close) and nothing is answered, while the socket stays open
    /// until the returned guard is dropped. Its edges find out when a reply is overdue.
    pub fn crash(mut self) -> Frozen {
        if let Some(c) = self.crash.take() {
            let _ = c.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Frozen { _endpoint: self.endpoint.clone() }
    }
}

/// The open socket of a crashed server ([`BackgroundServer::crash`]).
pub struct Frozen {
    _endpoint: quinn::Endpoint,
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if self.crash.is_none() {
            return; // crashed: nothing may be sent
        }
        self.endpoint.close(0u32.into(), b"server stopping");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
