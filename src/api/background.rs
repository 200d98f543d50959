//! [`BackgroundEdge`]: the edge service on its own thread and runtime (tests, benchmarks).

use std::net::SocketAddr;
use std::sync::Arc;

use super::EdgeService;
use crate::error::{Error, Result};

/// An edge service listening on loopback until dropped.
pub struct BackgroundEdge {
    /// Where it listens (HTTP).
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundEdge {
    /// Binds `listen` (port 0: any free port) and starts serving; returns once it listens.
    pub fn start(service: Arc<EdgeService>, listen: SocketAddr) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hat-serve-edge".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::invalid(format!("cannot start a runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Error::io(listen.to_string(), e)));
                            return;
                        }
                    };
                    let _ = ready_tx.send(listener.local_addr().map_err(|e| Error::io(listen.to_string(), e)));
                    let _ = super::serve(service, listener, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                });
                // Generations still running end when their clients are gone; do not wait for them.
                rt.shutdown_background();
            })
            .map_err(|e| Error::invalid(format!("cannot start a thread: {e}")))?;
        let addr = ready_rx.recv().map_err(|_| Error::invalid("the edge service did not start"))??;
        Ok(Self { addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The service's base URL for OpenAI clients: `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for BackgroundEdge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
