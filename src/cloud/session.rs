//! One edge's session: the handshake (version, token, split, hidden size), the session limit,
//! then blocks of hidden states through the middle layers, each checked before it is computed,
//! and link probes answered with zero padding.
//! A malformed or refused request gets an error frame and ends that session only.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cloud::metrics::CloudMetrics;
use crate::cloud::pending::await_with_notices;
use crate::cloud::server::{log, Shared};
use crate::error::{Error, Result};
use crate::model::tree::BlockCache;
use crate::net::protocol::{read_frame_by, write_frame, ErrorCode, HiddenBlock, Message, MAX_FRAME, MAX_PROBE, PROTOCOL_VERSION};

/// Drops a session's compute intervals from the load when the session ends.
struct ForgetOnDrop(Arc<crate::cloud::server::Shared>, u64);

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.0.load.forget(self.1);
        self.0.metrics.sessions_active.dec();
    }
}

/// How long an error frame may take to go out before the session ends without it.
const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends an error frame (if the peer takes it soon), logs it and ends the session.
async fn refuse(metrics: &CloudMetrics, send: &mut quinn::SendStream, code: ErrorCode, message: String) -> Result<()> {
    metrics.error(code);
    let frame = Message::Error { code, message: message.clone() }.encode();
    if let Ok(Ok(())) = tokio::time::timeout(REFUSAL_TIMEOUT, write_frame(send, &frame)).await {
        metrics.bytes_sent.inc_by(frame.len() as u64 + 4);
    }
    let _ = send.finish();
    Err(Error::invalid(format!("refused ({code:?}): {message}")))
}

/// Writes a frame within `deadline`: a peer that stops reading (or gives no stream credit)
/// loses its session instead of holding a slot and a cache.
pub(crate) async fn send_within(metrics: &CloudMetrics, send: &mut quinn::SendStream, body: &[u8], deadline: std::time::Duration) -> Result<()> {
    match tokio::time::timeout(deadline, write_frame(send, body)).await {
        Ok(r) => {
            metrics.bytes_sent.inc_by(body.len() as u64 + 4);
            r
        }
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(1));
            Err(Error::invalid(format!("the edge took no frame for {deadline:?} (it stopped reading): session ended")))
        }
    }
}

pub(crate) async fn session(shared: Arc<Shared>, mut send: quinn::SendStream, mut recv: quinn::RecvStream, remote: SocketAddr) -> Result<()> {
    let cfg = &shared.config;
    let manifest = &shared.bundle.manifest;
    let hello = match tokio::time::timeout(cfg.idle_timeout.min(cfg.handshake_timeout), read_frame_by(&mut recv, 64 << 10, None)).await {
        Ok(Ok(Some(body))) => {
            shared.metrics.bytes_received.inc_by(body.len() as u64 + 4);
            Message::decode(&body)
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => return refuse(&shared.metrics, &mut send, ErrorCode::IdleTimeout, "no handshake".into()).await,
    };
    let (dtype, hidden) = match hello {
        Ok(Message::Hello { version, split_id, token, hidden_size, dtype }) => {
            if version != PROTOCOL_VERSION {
                return refuse(&shared.metrics, &mut send, ErrorCode::VersionMismatch, format!("protocol version {version}, this cloud speaks {PROTOCOL_VERSION}")).await;
            }
            if let Some(want) = &cfg.token {
                if !crate::util::digest::secrets_match(&token, want) {
                    if let Some(p) = shared.penalties.failed(remote.ip()) {
                        log(format!("{remote}: wrong token again: this address is refused for {} s", p.as_secs()));
                    }
                    return refuse(&shared.metrics, &mut send, ErrorCode::Unauthorized, "wrong or missing token".into()).await;
                }
            }
            if cfg.token.is_some() {
                shared.penalties.passed(remote.ip());
            }
            if split_id != manifest.split_id {
                return refuse(
                    &shared.metrics,
                    &mut send,
                    ErrorCode::SplitMismatch,
                    format!("the device bundle is split {split_id}, this cloud serves split {}", manifest.split_id),
                )
                .await;
            }
            if hidden_size as usize != manifest.hidden_size {
                return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, format!("hidden size {hidden_size}, the model's is {}", manifest.hidden_size)).await;
            }
            (dtype, hidden_size as usize)
        }
        Ok(other) => return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, format!("expected a handshake, got {}", other.kind_name())).await,
        Err(e) => return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, e.to_string()).await,
    };
    let Ok(_permit) = shared.sessions.clone().try_acquire_owned() else {
        return refuse(&shared.metrics, &mut send, ErrorCode::Busy, format!("the cloud already serves its maximum of {} sessions", cfg.max_sessions)).await;
    };
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    shared.metrics.sessions.inc();
    shared.metrics.sessions_active.inc();
    // However the session ends, its work stops counting as load (nor the session as active).
    let _forget = ForgetOnDrop(shared.clone(), id);
    let range = manifest.plan.middle_range();
    let welcome = Message::Welcome {
        session: id,
        max_context: cfg.max_context as u32,
        middle_start: range.start as u32,
        middle_end: range.end as u32,
        cost: cfg.cost.clone(),
        load: shared.load(id),
    };
    send_within(&shared.metrics, &mut send, &welcome.encode(), cfg.write_timeout).await?;
    log(format!("session {id} from {remote}: open ({} on the wire)", dtype.name()));

    let bundle = shared.bundle.clone();
    let mut cache = Some(BlockCache::new(&bundle.middle));
    // The largest frame this session may send: its whole context in its own wire dtype (or a probe).
    let max_frame = MAX_FRAME.min((cfg.max_context * hidden * dtype.size() + 64).max(MAX_PROBE + 64));
    let (mut blocks, started) = (0u64, Instant::now());
    loop {
        let body = match tokio::time::timeout(cfg.idle_timeout, read_frame_by(&mut recv, max_frame, Some(cfg.handshake_timeout))).await {
            Err(_) => return refuse(&shared.metrics, &mut send, ErrorCode::IdleTimeout, format!("session {id} idle for {:?}", cfg.idle_timeout)).await,
            Ok(Ok(None)) => break,
            Ok(Ok(Some(b))) => {
                shared.metrics.bytes_received.inc_by(b.len() as u64 + 4);
                b
            }
            Ok(Err(e)) => return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, e.to_string()).await,
        };
        let (block, parents, keep) = match Message::decode(&body) {
            Ok(Message::Hidden(b)) => (b, Vec::new(), Vec::new()),
            Ok(Message::Tree { block, parents, keep }) => (block, parents, keep),
            Ok(Message::Close) => break,
            Ok(Message::Probe { echo, .. }) => {
                shared.metrics.probes.inc();
                send_within(&shared.metrics, &mut send, &Message::ProbeEcho { padding: vec![0; echo as usize] }.encode(), cfg.write_timeout).await?;
                continue;
            }
            Ok(other) => return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, format!("unexpected {} frame", other.kind_name())).await,
            Err(e) => return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, e.to_string()).await,
        };
        let (start, count) = (block.start as usize, block.count as usize);
        if let Err(e) = block.check(hidden, dtype) {
            return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, e.to_string()).await;
        }
        if let Some(Err(e)) = cache.as_ref().map(|c| c.check(start, count, &parents, &keep)) {
            return refuse(&shared.metrics, &mut send, ErrorCode::BadRequest, e.to_string()).await;
        }
        if start + count > cfg.max_context {
            return refuse(&shared.metrics, &mut send, ErrorCode::ContextTooLong, format!("{} positions exceed this cloud's limit of {}", start + count, cfg.max_context)).await;
        }
        let mut c = cache.take().ok_or_else(|| Error::invalid("cache lost"))?;
        let bundle = bundle.clone();
        let meter = shared.clone();
        let (received, tree) = (Instant::now(), !parents.is_empty());
        let predicted = Duration::from_secs_f64(cfg.cost.middle.predict(count, start).max(0.0) / 1e3);
        let work = async {
            match &shared.batcher {
                Some(batcher) => {
                    let (reply, done) = tokio::sync::oneshot::channel();
                    let job = crate::cloud::batch::Job { session: id, cache: c, block, parents, keep, hidden, dtype, received, reply };
                    match batcher.submit(job) {
                        Ok(()) => done.await.map(|d| (d.cache, d.out, d.compute)).map_err(|_| ()),
                        Err(_) => Err(()),
                    }
                }
                None => tokio::task::spawn_blocking(move || {
                    meter.metrics.queue_wait_seconds.observe(received.elapsed().as_secs_f64());
                    let _on_the_clock = meter.passes.begin(predicted);
                    let t = meter.load.begin(id);
                    let out = (|| {
                        std::thread::sleep(meter.config.pass_delay);
                        let x = block.to_tensor(hidden, &candle_core::Device::Cpu)?;
                        let y = crate::util::threads::in_pool(|| c.run(&bundle.middle, &x, start, &parents, &keep))?;
                        HiddenBlock::from_tensor(&y, start, dtype)
                    })();
                    meter.load.end(id, t, count);
                    let took = t.elapsed();
                    if out.is_ok() {
                        meter.metrics.block(tree, count);
                    }
                    meter.metrics.pass(1, count, took.as_secs_f64());
                    (c, out, took)
                })
                .await
                .map_err(|_| ()),
            }
        };
        // While it waits, the edge hears that the block is pending (so a long queue is not taken
        // for a cloud gone); an edge that stops taking those loses its session.
        let computed = match await_with_notices(work, &shared.passes, &shared.metrics, &mut send, start as u32, cfg.write_timeout).await {
            Ok(computed) => computed,
            Err(e) => {
                log(format!("session {id}: {e}"));
                return Err(e);
            }
        };
        // A panic in the compute task ends this session with an error frame, nothing else.
        let Ok((c, out, took)) = computed else {
            return refuse(&shared.metrics, &mut send, ErrorCode::Internal, "the computation failed".into()).await;
        };
        cache = Some(c);
        match out {
            Ok(block) => {
                let msg = Message::Middle { block, compute_us: took.as_micros() as u64, load: shared.load(id) };
                if let Err(e) = send_within(&shared.metrics, &mut send, &msg.encode(), cfg.write_timeout).await {
                    log(format!("session {id}: {e}"));
                    return Err(e);
                }
                blocks += 1;
            }
            Err(e) => return refuse(&shared.metrics, &mut send, ErrorCode::Internal, e.to_string()).await,
        }
    }
    let _ = send.finish();
    log(format!("session {id}: closed after {blocks} blocks, {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}
