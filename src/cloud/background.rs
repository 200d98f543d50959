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
