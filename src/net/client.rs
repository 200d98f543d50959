//! [`QuicLink`]: the edge's session with `hat serve-cloud` over QUIC, optionally through an
//! emulated link, with every frame shown to a [`FrameTap`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
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
}

/// A session with `hat serve-cloud`. Network I/O runs on its own tokio runtime; the caller's
/// thread only computes and waits for replies.
pub struct QuicLink {
    runtime: Option<tokio::runtime::Runtime>,
    /// Frames to send; `None` once closed (the writer then finishes the stream).
    up: Option<tokio::sync::mpsc::UnboundedSender<(Instant, Vec<u8>)>>,
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
    /// Start and count of each block sent and not yet answered, in order (a reply must match).
    awaited: std::collections::VecDeque<(usize, usize)>,
}

/// Throughputs above this count as "unlimited" (loopback).
const MAX_MEASURED_MBPS: f64 = 100_000.0;

fn cloud_error(code: ErrorCode, message: &str) -> Error {
    Error::invalid(format!("the cloud refused: {message} ({code:?})"))
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hat-edge-net")
            .enable_all()
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the network runtime: {e}")))?;
        let tls = crate::net::tls::client_config(&opts.trust)?;
        let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let tap = opts.tap.clone();
        let emu = opts.emulation;
        let (connection, endpoint, writer) = runtime.block_on(async {
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
                .map_err(|e| Error::invalid(format!("cannot connect to the cloud at {}: {e}", opts.addr)))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Error::invalid(format!("cannot open a stream: {e}")))?;
            let tap_up = tap.clone();
            let writer = tokio::spawn(async move {
                let mut pipe = Pipe::new(emu.up_mbps, emu.rtt_ms);
                while let Some((queued, body)) = up_rx.recv().await {
                    let arrive = pipe.arrival(queued, body.len() + 4);
                    tokio::time::sleep_until(arrive.into()).await;
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
            tokio::spawn(async move {
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
                        Ok(None) => Err(Error::invalid("the cloud closed the session")),
                        Err(e) => Err(e),
                    };
                    let stop = item.is_err();
                    if down_tx.send(item).is_err() || stop {
                        break;
                    }
                }
            });
            Ok::<_, Error>((conn, endpoint, writer))
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
        };
        let sent = Instant::now();
        link.send(&Message::Hello {
            version,
            split_id: opts.split_id,
            token: opts.token.unwrap_or_default(),
            hidden_size: opts.hidden_size as u32,
            dtype: opts.dtype,
        })?;
        match link.next_message()? {
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

    fn next_message(&mut self) -> Result<Message> {
        let item = match self.held.take() {
            Some(held) => Ok(held),
            None => self.down.recv().map_err(|_| Error::invalid("the connection to the cloud is closed"))?,
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

    fn reply(&mut self, msg: Message) -> Result<MiddleReply> {
        match msg {
            Message::Middle { block, .. } if self.awaited.front() != Some(&(block.start as usize, block.count as usize)) => Err(Error::invalid(format!(
                "the cloud answered positions {}..{}, but the next block awaited is {}",
                block.start,
                block.start as u64 + block.count as u64,
                self.awaited.front().map_or("none".to_string(), |&(s, n)| format!("{s}..{}", s + n))
            ))),
            Message::Middle { block, compute_us, load } => {
                self.awaited.pop_front();
                Ok(MiddleReply {
                load: Some({
                    self.load = load;
                    load
                }),
                start: block.start as usize,
                hidden: block.to_tensor(self.hidden_size, &Device::Cpu)?,
                cloud_compute: Duration::from_micros(compute_us),
                })
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
        let up = self.up.as_ref().ok_or_else(|| Error::invalid("the connection to the cloud is closed"))?;
        up.send((Instant::now(), body)).map_err(|_| Error::invalid("the connection to the cloud is closed"))
    }
}

impl MiddleLink for QuicLink {
    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()> {
        let block = HiddenBlock::from_tensor(hidden, start, self.dtype)?;
        self.awaited.push_back((start, block.count as usize));
        if parents.is_empty() && keep.is_empty() {
            self.send(&Message::Hidden(block))
        } else {
            self.send(&Message::Tree { block, parents: parents.to_vec(), keep: keep.to_vec() })
        }
    }

    fn receive(&mut self) -> Result<MiddleReply> {
        let msg = self.next_message()?;
        self.reply(msg)
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        if self.held.is_none() {
            match self.down.try_recv() {
                Ok(item) => self.held = Some(item?),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                Err(_) => return Err(Error::invalid("the connection to the cloud is closed")),
            }
        }
        // Only hand it over once the emulated link has delivered it.
        match &self.held {
            Some((at, _)) if *at <= Instant::now() => self.receive().map(Some),
            _ => Ok(None),
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
        let _ = self.send(&Message::Close);
        self.up = None;
        if let Some(rt) = self.runtime.take() {
            let (conn, endpoint, writer) = (self.connection.clone(), self.endpoint.clone(), self.writer.take());
            rt.block_on(async {
                if let Some(w) = writer {
                    let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
                }
                conn.close(0u32.into(), b"bye");
                let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        }
    }
}
