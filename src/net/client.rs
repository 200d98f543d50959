//! [`QuicLink`]: the edge's session with `hat serve-cloud` over QUIC, optionally through an
//! emulated link, with every frame shown to a [`FrameTap`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{CloudFailure, Error, Result};
use crate::net::emulation::{LinkEmulation, Pipe};
use crate::net::link::{Direction, FrameTap, LinkStats, MiddleLink, MiddleReply};
use crate::net::protocol::{read_frame, write_frame, CloudLoad, ErrorCode, HiddenBlock, Message, WireDtype, MAX_FRAME, PROTOCOL_VERSION};
use crate::sched::{CloudModel, LinkEstimate};
use crate::net::transport::transport_config;

/// How the edge opens a session.
#[derive(Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    pub trust: crate::net::tls::Trust,
    pub token: Option<String>,
    pub split_id: String,
    pub hidden_size: usize,
    pub dtype: WireDtype,
    pub emulation: LinkEmulation,
    pub tap: Option<FrameTap>,
    /// How long connecting and the handshake may take before the cloud counts as unreachable.
    pub connect_timeout: Duration,
    /// The tokio runtime the session's network tasks run on. `None`: the session starts its
    /// own (one worker thread). With a runtime, the session's blocking calls must come from
    /// outside its async tasks (e.g. a `spawn_blocking` thread), as a service's do.
    pub runtime: Option<tokio::runtime::Handle>,
}

/// The default for [`ConnectOptions::connect_timeout`]: a cloud that is there answers the
/// handshake in a few round trips.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The runtime a session's network tasks run on.
enum NetRuntime {
    /// Started by the session, stopped when it ends.
    Owned(tokio::runtime::Runtime),
    /// A service's runtime, shared by its sessions.
    Shared(tokio::runtime::Handle),
}

impl NetRuntime {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            NetRuntime::Owned(rt) => rt.block_on(f),
            NetRuntime::Shared(h) => h.block_on(f),
        }
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            NetRuntime::Owned(rt) => rt.handle(),
            NetRuntime::Shared(h) => h,
        }
    }
}

/// A session with `hat serve-cloud`. Network I/O runs on its own tokio runtime; the caller's
/// thread only computes and waits for replies.
pub struct QuicLink {
    runtime: Option<NetRuntime>,
    /// Frames to send, with when they were handed over, to the uplink's pacing thread; `None`
    /// once closed (the pacer then stops, and the writer finishes the stream).
    up: Option<UplinkFrames>,
    /// The writer task, awaited on close so that the last frames leave before the connection
    /// closes.
    writer: Option<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    down: std::sync::mpsc::Receiver<Result<(Instant, Vec<u8>)>>,
    /// A frame received but not yet delivered by the emulated link.
    held: Option<(Instant, Vec<u8>)>,
    connection: quinn::Connection,
    hidden_size: usize,
    dtype: WireDtype,
    stats: LinkStats,
    /// Session id and the cloud's layer range, from the handshake.
    pub session: u64,
    pub middle_layers: (u32, u32),
    pub max_context: usize,
    /// The cloud's cost model and its load when the session opened, from the handshake.
    pub cloud_model: CloudModel,
    pub welcome_load: CloudLoad,
    /// The load sent with the latest reply.
    pub load: CloudLoad,
    /// Hello sent → welcome received: a round trip on this session's link.
    pub handshake_rtt: Duration,
    /// Start and count of each block sent and not yet answered, in order (a reply must match),
    /// with when it was sent.
    awaited: std::collections::VecDeque<Awaited>,
    /// Whether dropping the session waits (briefly) for its last frames and the close to go
    /// out; not for a session given up on ([`QuicLink::abandon`]).
    polite: bool,
    /// When the latest reply or pending notice arrived (the cloud computes blocks in turn: the
    /// next one's time runs from here at the earliest; a notice says the cloud is busy, not
    /// gone, and restarts the allowance).
    last_sign: Instant,
}

/// A block sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Awaited {
    start: usize,
    count: usize,
    sent: Instant,
}

/// A reply is overdue (the cloud is gone or stuck) after this, plus [`OVERDUE_FACTOR`] times
/// the time it should take.
pub const OVERDUE_MIN: Duration = Duration::from_secs(3);
/// See [`OVERDUE_MIN`].
pub const OVERDUE_FACTOR: f64 = 4.0;
/// A link probe's echo is overdue after this (probes are at most a few hundred KiB).
pub const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// The frame that carries a block: hidden states `(1, count, hidden)` of positions
/// `start..start + count`, as a sequence or as a draft tree (see [`MiddleLink::submit_tree`]);
/// returns its row count beside.
pub fn block_message(start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16], dtype: WireDtype) -> Result<(usize, Message)> {
    let block = HiddenBlock::from_tensor(hidden, start, dtype)?;
    let count = block.count as usize;
    Ok(if parents.is_empty() && keep.is_empty() { (count, Message::Hidden(block)) } else { (count, Message::Tree { block, parents: parents.to_vec(), keep: keep.to_vec() }) })
}

/// Throughputs above this count as "unlimited" (loopback).
const MAX_MEASURED_MBPS: f64 = 100_000.0;

fn cloud_error(code: ErrorCode, message: &str) -> Error {
    let failure = if code == ErrorCode::Busy { CloudFailure::Busy } else { CloudFailure::Refused };
    Error::cloud(failure, format!("the cloud refused: {message} ({code:?})"))
}

/// Frames handed to the uplink, with the instant each was handed over.
type UplinkFrames = std::sync::mpsc::Sender<(Instant, Vec<u8>)>;

/// The uplink's pacing: a thread that holds each frame until the emulated link would deliver
/// it ([`Pipe`]), then hands it to the writer task. A thread's sleep ends within tens of
/// microseconds of its deadline, where the runtime's timers round up to the next millisecond
/// (the uplink then added 1.1 ms on average to every round trip, the configured RTT included).
/// Returns where frames go in (with the instant they were handed over) and where they come
/// out; the thread ends when the sender is dropped, after the frames before.
fn uplink_pacer(emu: LinkEmulation) -> Result<(UplinkFrames, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>)> {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let (paced_tx, paced_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("hat-edge-uplink".into())
        .spawn(move || {
            let mut pipe = Pipe::new(emu.up_mbps, emu.rtt_ms);
            while let Ok((queued, body)) = rx.recv() {
                let arrive = pipe.arrival(queued, body.len() + 4);
                let now = Instant::now();
                if arrive > now {
                    std::thread::sleep(arrive - now);
                }
                if paced_tx.send(body).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Error::invalid(format!("cannot start the uplink thread: {e}")))?;
    Ok((tx, paced_rx))
}

fn closed() -> Error {
    Error::cloud(CloudFailure::Lost, "the connection to the cloud is closed")
}

impl QuicLink {
    /// Connects, checks the cloud's certificate, and opens a session (split id, token, hidden
    /// size and dtype are checked by the cloud).
    pub fn connect(opts: ConnectOptions) -> Result<Self> {
        Self::connect_with_version(opts, PROTOCOL_VERSION)
    }

    /// [`QuicLink::connect`] announcing another protocol version (tests of version refusals).
    #[doc(hidden)]
    pub fn connect_with_version(opts: ConnectOptions, version: u16) -> Result<Self> {
        opts.emulation.validate()?;
        let runtime = match &opts.runtime {
            Some(h) => NetRuntime::Shared(h.clone()),
            None => NetRuntime::Owned(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("hat-edge-net")
                    .enable_all()
                    .build()
                    .map_err(|e| Error::invalid(format!("cannot start the network runtime: {e}")))?,
            ),
        };
        let deadline = Instant::now() + opts.connect_timeout;
        let unreachable = |why: String| Error::cloud(CloudFailure::Unreachable, format!("cannot reach the cloud at {}: {why}", opts.addr));
        let tls = crate::net::tls::client_config(&opts.trust)?;
        let (up_tx, mut up_rx) = uplink_pacer(opts.emulation)?;
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let tap = opts.tap.clone();
        let emu = opts.emulation;
        let handle = runtime.handle().clone();
        let opening = async {
            let bind: SocketAddr = if opts.addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| Error::invalid("bind address"))?;
            let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::invalid(format!("cannot open a UDP socket: {e}")))?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::invalid(format!("TLS: {e}")))?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(Arc::new(transport_config()));
            endpoint.set_default_client_config(cfg);
            let conn = endpoint
                .connect(opts.addr, crate::net::tls::SERVER_NAME)
                .map_err(|e| Error::invalid(format!("cannot connect to {}: {e}", opts.addr)))?
                .await
                .map_err(|e| match e {
                    // A certificate that does not match the pin is the user's to fix, not a
                    // cloud that is away.
                    quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) => Error::invalid(format!("cannot connect to the cloud at {}: {e}", opts.addr)),
                    e => unreachable(e.to_string()),
                })?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(format!("cannot open a stream: {e}")))?;
            let tap_up = tap.clone();
            let writer = handle.spawn(async move {
                while let Some(body) = up_rx.recv().await {
                    if let Some(t) = &tap_up {
                        t(Direction::Up, &body);
                    }
                    if write_frame(&mut send, &body).await.is_err() {
                        break;
                    }
                }
                // Wait (briefly) until the cloud has read the stream, so closing the connection
                // cannot drop the last frames.
                if send.finish().is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                }
            });
            handle.spawn(async move {
                let mut pipe = Pipe::new(emu.down_mbps, emu.rtt_ms);
                loop {
                    let frame = read_frame(&mut recv, MAX_FRAME).await;
                    let item = match frame {
                        Ok(Some(body)) => {
                            if let Some(t) = &tap {
                                t(Direction::Down, &body);
                            }
                            Ok((pipe.arrival(Instant::now(), body.len() + 4), body))
                        }
                        Ok(None) => Err(Error::cloud(CloudFailure::Lost, "the cloud closed the session")),
                        Err(e) => Err(Error::cloud(CloudFailure::Lost, format!("the connection to the cloud failed: {e}"))),
                    };
                    let stop = item.is_err();
                    if down_tx.send(item).is_err() || stop {
                        break;
                    }
                }
            });
            Ok::<_, Error>((conn, endpoint, writer))
        };
        let (connection, endpoint, writer) = runtime.block_on(async {
            tokio::time::timeout_at(deadline.into(), opening).await.map_err(|_| unreachable(format!("no answer within {:.1} s", opts.connect_timeout.as_secs_f64())))?
        })?;
        let mut link = Self {
            runtime: Some(runtime),
            up: Some(up_tx),
            writer: Some(writer),
            endpoint,
            down: down_rx,
            held: None,
            connection,
            hidden_size: opts.hidden_size,
            dtype: opts.dtype,
            stats: LinkStats::default(),
            session: 0,
            middle_layers: (0, 0),
            max_context: 0,
            cloud_model: CloudModel::default(),
            welcome_load: CloudLoad::default(),
            load: CloudLoad::default(),
            handshake_rtt: Duration::ZERO,
            awaited: std::collections::VecDeque::new(),
            last_sign: Instant::now(),
            polite: true,
        };
        let sent = Instant::now();
        link.send(&Message::Hello {
            version,
            split_id: opts.split_id,
            token: opts.token.unwrap_or_default(),
            hidden_size: opts.hidden_size as u32,
            dtype: opts.dtype,
        })?;
        let welcome = match link.down.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(item) => link.deliver(item)?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(unreachable(format!("no handshake within {:.1} s", opts.connect_timeout.as_secs_f64()))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(closed()),
        };
        match welcome {
            Message::Welcome { session, max_context, middle_start, middle_end, cost, load } => {
                link.handshake_rtt = sent.elapsed();
                link.cloud_model = cost;
                link.welcome_load = load;
                link.load = load;
                link.session = session;
                link.max_context = max_context as usize;
                link.middle_layers = (middle_start, middle_end);
                Ok(link)
            }
            Message::Error { code, message } => Err(cloud_error(code, &message)),
            other => Err(Error::invalid(format!("the cloud answered the handshake with {other:?}"))),
        }
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_raw(msg.encode())
    }

    fn deliver(&mut self, item: Result<(Instant, Vec<u8>)>) -> Result<Message> {
        let (at, body) = item?;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        self.stats.bytes_down += body.len() as u64 + 4;
        Message::decode(&body)
    }

    /// The next frame (probe echoes): one that does not come within [`PROBE_DEADLINE`] means
    /// the cloud is gone.
    fn next_message(&mut self) -> Result<Message> {
        let item = match self.held.take() {
            Some(held) => Ok(held),
            None => self.down.recv_timeout(PROBE_DEADLINE).map_err(|e| match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => Error::cloud(CloudFailure::Lost, format!("no answer from the cloud within {} s", PROBE_DEADLINE.as_secs())),
                std::sync::mpsc::RecvTimeoutError::Disconnected => closed(),
            })?,
        };
        self.deliver(item)
    }

    /// One link probe: `up` zero bytes to the cloud, `down` back; the time from sending to the
    /// echo's arrival. Only between blocks (no reply may be outstanding).
    pub fn probe(&mut self, up: usize, down: usize) -> Result<Duration> {
        let t = Instant::now();
        self.send(&Message::Probe { echo: down as u32, padding: vec![0; up] })?;
        match self.next_message()? {
            Message::ProbeEcho { padding } if padding.len() == down => Ok(t.elapsed()),
            Message::Error { code, message } => Err(cloud_error(code, &message)),
            other => Err(Error::invalid(format!("expected a probe echo, got {}", other.kind_name()))),
        }
    }

    /// Measures the link with probes: the round trip (least of `rounds` empty probes), then
    /// the throughput each way from a probe of `bytes` (minus the round trip). Call before the
    /// first block.
    pub fn measure_link(&mut self, bytes: usize, rounds: usize) -> Result<LinkEstimate> {
        let mut rtt = Duration::MAX;
        for _ in 0..rounds.max(1) {
            rtt = rtt.min(self.probe(0, 0)?);
        }
        let rate = |took: Duration| {
            let secs = took.saturating_sub(rtt).as_secs_f64().max(1e-6);
            ((bytes + 16) as f64 * 8.0 / secs / 1e6).min(MAX_MEASURED_MBPS)
        };
        let up = rate(self.probe(bytes, 0)?);
        let down = rate(self.probe(0, bytes)?);
        Ok(LinkEstimate { rtt_ms: rtt.as_secs_f64() * 1e3, up_mbps: up, down_mbps: down })
    }

    /// A frame from the cloud while blocks are awaited: the next reply, or `None` for a pending
    /// notice about the next block (which restarts its allowance).
    fn reply(&mut self, msg: Message) -> Result<Option<MiddleReply>> {
        let front = self.awaited.front().map(|a| (a.start, a.count));
        let mismatch = |start: u32, count: Option<u32>| {
            Error::invalid(format!(
                "the cloud answered positions {}..{}, but the next block awaited is {}",
                start,
                start as u64 + count.unwrap_or(0) as u64,
                front.map_or("none".to_string(), |(s, c)| format!("{s}..{}", s + c))
            ))
        };
        match msg {
            Message::Pending { start } if front.map(|(s, _)| s) != Some(start as usize) => Err(mismatch(start, None)),
            Message::Pending { .. } => {
                self.last_sign = Instant::now();
                self.stats.pending_notices += 1;
                Ok(None)
            }
            Message::Middle { block, .. } if front != Some((block.start as usize, block.count as usize)) => Err(mismatch(block.start, Some(block.count))),
            Message::Middle { block, compute_us, load } => {
                self.awaited.pop_front();
                self.last_sign = Instant::now();
                self.load = load;
                Ok(Some(MiddleReply {
                    load: Some(load),
                    start: block.start as usize,
                    hidden: block.to_tensor(self.hidden_size, &Device::Cpu)?,
                    cloud_compute: Duration::from_micros(compute_us),
                }))
            }
            Message::Error { code, message } => Err(cloud_error(code, &message)),
            other => Err(Error::invalid(format!("unexpected {} frame from the cloud", other.kind_name()))),
        }
    }

    /// Sends a frame body as it is (tests use it to send malformed frames); [`Self::send`]
    /// sends encoded messages through it.
    #[doc(hidden)]
    pub fn send_raw(&mut self, body: Vec<u8>) -> Result<()> {
        self.stats.bytes_up += body.len() as u64 + 4;
        let up = self.up.as_ref().ok_or_else(closed)?;
        up.send((Instant::now(), body)).map_err(|_| closed())
    }
}

impl QuicLink {
    /// Sends a block's frame ([`block_message`]) of `count` rows from `start`; its reply is
    /// awaited in order.
    pub fn submit_message(&mut self, start: usize, count: usize, msg: &Message) -> Result<()> {
        self.awaited.push_back(Awaited { start, count, sent: Instant::now() });
        self.send(msg)
    }

    /// The wire dtype of this session's hidden states.
    pub fn dtype(&self) -> WireDtype {
        self.dtype
    }

    /// Closes a session given up on (the cloud is gone or stuck) without waiting for anything.
    pub fn abandon(mut self) {
        self.polite = false;
    }

    /// Blocks sent and not yet answered.
    pub fn awaiting(&self) -> usize {
        self.awaited.len()
    }

    /// When the next reply is overdue: [`OVERDUE_MIN`] plus [`OVERDUE_FACTOR`] times what it
    /// should take (a round trip and the cloud's predicted compute for the block under its
    /// load), counted from when the cloud could start it or last said it was still pending
    /// ([`Message::Pending`]). `None` when nothing is awaited.
    pub fn reply_deadline(&self) -> Option<Instant> {
        let a = self.awaited.front()?;
        let compute_ms = self.cloud_model.middle.predict(a.count, a.start).max(0.0) * self.cloud_model.slowdown_at(self.load.sessions as f64);
        let expected = self.handshake_rtt.as_secs_f64() + compute_ms / 1e3;
        let allowance = OVERDUE_MIN + Duration::from_secs_f64((OVERDUE_FACTOR * expected).clamp(0.0, 3600.0));
        Some(a.sent.max(self.last_sign) + allowance)
    }
}

impl MiddleLink for QuicLink {
    fn predicted_compute_ms(&self, rows: usize, start: usize) -> Option<f64> {
        let ms = self.cloud_model.middle.predict(rows, start);
        (ms > 0.0).then_some(ms)
    }

    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()> {
        let (count, msg) = block_message(start, hidden, parents, keep, self.dtype)?;
        self.submit_message(start, count, &msg)
    }

    /// The next reply; a reply overdue ([`QuicLink::reply_deadline`], which each pending notice
    /// moves on) is an error ([`CloudFailure::Lost`]), not a wait for QUIC's idle timeout.
    fn receive(&mut self) -> Result<MiddleReply> {
        loop {
            // Nothing awaited (a raw frame sent by a test): an answer comes at once or not at all.
            let deadline = self.reply_deadline().unwrap_or_else(|| Instant::now() + OVERDUE_MIN);
            let item = match self.held.take() {
                Some(held) => held,
                None => match self.down.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(item) => item?,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let waited = self.awaited.front().map_or(Duration::ZERO, |a| a.sent.elapsed());
                        let quiet = self.last_sign.elapsed().min(waited);
                        return Err(Error::cloud(
                            CloudFailure::Lost,
                            format!("no reply from the cloud after {:.1} s, and no sign of it for {:.1} s: it is gone or stuck", waited.as_secs_f64(), quiet.as_secs_f64()),
                        ));
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(closed()),
                },
            };
            let msg = self.deliver(Ok(item))?;
            if let Some(reply) = self.reply(msg)? {
                return Ok(reply);
            }
        }
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        loop {
            if self.held.is_none() {
                match self.down.try_recv() {
                    Ok(item) => self.held = Some(item?),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                    Err(_) => return Err(closed()),
                }
            }
            // Only hand it over once the emulated link has delivered it.
            match self.held.take() {
                Some(item) if item.0 <= Instant::now() => {
                    let msg = self.deliver(Ok(item))?;
                    if let Some(reply) = self.reply(msg)? {
                        return Ok(Some(reply));
                    }
                }
                held => {
                    self.held = held;
                    return Ok(None);
                }
            }
        }
    }

    fn stats(&self) -> LinkStats {
        self.stats
    }
}

impl Drop for QuicLink {
    /// Ends the session cleanly: the Close frame goes out (through the emulated link, so after
    /// its delay), the stream finishes, then the connection closes and the close reaches the
    /// cloud before the runtime stops; the cloud frees the session at once instead of waiting
    /// for the idle timeout.
    fn drop(&mut self) {
        if !self.polite {
            self.up = None;
            self.connection.close(0u32.into(), b"abandoned");
            if let Some(NetRuntime::Owned(rt)) = self.runtime.take() {
                rt.shutdown_background();
            }
            return;
        }
        let _ = self.send(&Message::Close);
        self.up = None;
        if let Some(rt) = self.runtime.take() {
            let (conn, endpoint, writer) = (self.connection.clone(), self.endpoint.clone(), self.writer.take());
            let close = async move {
                if let Some(w) = writer {
                    let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
                }
                conn.close(0u32.into(), b"bye");
                let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            };
            match rt {
                NetRuntime::Owned(rt) => {
                    rt.block_on(close);
                    rt.shutdown_timeout(Duration::from_millis(100));
                }
                // A shared runtime goes on: the close runs there, without holding this thread.
                NetRuntime::Shared(h) => drop(h.spawn(close)),
            }
        }
    }
}
