//! The device's view of the cloud: submit the input submodel's hidden states for a block of
//! positions, receive the middle submodel's output for them, in order.
//!
//! - [`LocalMiddle`] runs the middle layers in-process (no network; wire rounding emulated): used
//!   by tests and to measure acceptance while training the adapter.
//! - [`QuicLink`] talks to `hat serve-cloud` over QUIC, optionally through an emulated link
//!   (rate and round-trip time), and lets a [`FrameTap`] see every frame it sends and receives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{LayerStack, StackCache};
use crate::protocol::{read_frame, write_frame, ErrorCode, HiddenBlock, Message, WireDtype, MAX_FRAME, PROTOCOL_VERSION};

/// The middle layers' output for one submitted block.
#[derive(Debug, Clone)]
pub struct MiddleReply {
    pub start: usize,
    /// `(1, count, hidden)`, f32.
    pub hidden: Tensor,
    /// Time the cloud spent computing it.
    pub cloud_compute: Duration,
}

/// Bytes that crossed the link (frames with their length prefixes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The cloud's middle submodel as the device sees it.
pub trait MiddleLink {
    /// Sends hidden states `(1, count, hidden)` of positions `start..start + count`; the cloud
    /// first drops every cached position at or after `start`.
    fn submit(&mut self, start: usize, hidden: &Tensor) -> Result<()>;
    /// The next reply, in submission order (blocks until it arrives).
    fn receive(&mut self) -> Result<MiddleReply>;
    /// The next reply if it has already arrived.
    fn try_receive(&mut self) -> Result<Option<MiddleReply>>;
    fn stats(&self) -> LinkStats;
}

/// The middle layers run in this process, with the wire's rounding applied both ways.
pub struct LocalMiddle<'a> {
    middle: &'a LayerStack,
    cache: StackCache,
    dtype: WireDtype,
    ready: VecDeque<MiddleReply>,
    stats: LinkStats,
}

impl<'a> LocalMiddle<'a> {
    pub fn new(middle: &'a LayerStack, dtype: WireDtype) -> Self {
        Self { middle, cache: middle.new_cache(), dtype, ready: VecDeque::new(), stats: LinkStats::default() }
    }
}

impl MiddleLink for LocalMiddle<'_> {
    fn submit(&mut self, start: usize, hidden: &Tensor) -> Result<()> {
        if start > self.cache.len() {
            return Err(Error::invalid(format!("block starts at {start}, after the {} cached positions", self.cache.len())));
        }
        let t = Instant::now();
        let x = self.dtype.round_trip(hidden)?;
        self.cache.truncate(start);
        let y = self.dtype.round_trip(&self.middle.forward(&x, start, &mut self.cache)?)?;
        let payload = hidden.elem_count() * self.dtype.size();
        self.stats.bytes_up += (payload + crate::protocol::HIDDEN_FRAME_OVERHEAD) as u64;
        self.stats.bytes_down += (payload + crate::protocol::MIDDLE_FRAME_OVERHEAD) as u64;
        self.ready.push_back(MiddleReply { start, hidden: y, cloud_compute: t.elapsed() });
        Ok(())
    }

    fn receive(&mut self) -> Result<MiddleReply> {
        self.ready.pop_front().ok_or_else(|| Error::invalid("receive without a submitted block"))
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        Ok(self.ready.pop_front())
    }

    fn stats(&self) -> LinkStats {
        self.stats
    }
}

/// An emulated network link, applied by the edge to what it sends and receives: each frame
/// waits for the link to be free, takes `bytes * 8 / rate` to serialise, then half the
/// round-trip time to propagate. Emulation only: the real transport underneath is loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkEmulation {
    /// Uplink rate (device → cloud), Mbit/s; `None` = unlimited.
    pub up_mbps: Option<f64>,
    /// Downlink rate (cloud → device), Mbit/s; `None` = unlimited.
    pub down_mbps: Option<f64>,
    /// Round-trip propagation delay.
    pub rtt_ms: f64,
}

impl LinkEmulation {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("--link-up-mbps", self.up_mbps), ("--link-down-mbps", self.down_mbps)] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::invalid(format!("{name} {v} must be a positive number")));
                }
            }
        }
        if !(self.rtt_ms >= 0.0 && self.rtt_ms.is_finite()) {
            return Err(Error::invalid(format!("--link-rtt-ms {} must be >= 0", self.rtt_ms)));
        }
        Ok(())
    }
}

/// One direction of an emulated link: a FIFO with a rate and a propagation delay.
#[derive(Debug)]
struct Pipe {
    mbps: Option<f64>,
    one_way: Duration,
    free_at: Instant,
}

impl Pipe {
    fn new(mbps: Option<f64>, rtt_ms: f64) -> Self {
        Self { mbps, one_way: Duration::from_secs_f64(rtt_ms / 2e3), free_at: Instant::now() }
    }

    /// When a frame of `bytes` handed to the link at `at` arrives at the other end.
    fn arrival(&mut self, at: Instant, bytes: usize) -> Instant {
        let start = at.max(self.free_at);
        let serialise = self.mbps.map_or(Duration::ZERO, |r| Duration::from_secs_f64(bytes as f64 * 8.0 / (r * 1e6)));
        self.free_at = start + serialise;
        self.free_at + self.one_way
    }
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

/// Sees every frame body the edge sends or receives (for audits and tests).
pub type FrameTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// Explicit QUIC transport settings: large windows for bulk hidden states, keep-alives.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))));
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t
}

/// How the edge opens a session.
#[derive(Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    pub trust: crate::tls::Trust,
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
    up: tokio::sync::mpsc::UnboundedSender<(Instant, Vec<u8>)>,
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
}

fn cloud_error(code: ErrorCode, message: &str) -> Error {
    Error::invalid(format!("the cloud refused: {message} ({code:?})"))
}

impl QuicLink {
    /// Connects, checks the cloud's certificate, and opens a session (split id, token, hidden
    /// size and dtype are checked by the cloud).
    pub fn connect(opts: ConnectOptions) -> Result<Self> {
        opts.emulation.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hat-edge-net")
            .enable_all()
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the network runtime: {e}")))?;
        let tls = crate::tls::client_config(&opts.trust)?;
        let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let tap = opts.tap.clone();
        let emu = opts.emulation;
        let connection = runtime.block_on(async {
            let bind: SocketAddr = if opts.addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| Error::invalid("bind address"))?;
            let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::invalid(format!("cannot open a UDP socket: {e}")))?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::invalid(format!("TLS: {e}")))?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(Arc::new(transport_config()));
            endpoint.set_default_client_config(cfg);
            let conn = endpoint
                .connect(opts.addr, crate::tls::SERVER_NAME)
                .map_err(|e| Error::invalid(format!("cannot connect to {}: {e}", opts.addr)))?
                .await
                .map_err(|e| Error::invalid(format!("cannot connect to the cloud at {}: {e}", opts.addr)))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Error::invalid(format!("cannot open a stream: {e}")))?;
            let tap_up = tap.clone();
            tokio::spawn(async move {
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
                let _ = send.finish();
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
            Ok::<_, Error>(conn)
        })?;
        let mut link = Self {
            runtime: Some(runtime),
            up: up_tx,
            down: down_rx,
            held: None,
            connection,
            hidden_size: opts.hidden_size,
            dtype: opts.dtype,
            stats: LinkStats::default(),
            session: 0,
            middle_layers: (0, 0),
            max_context: 0,
        };
        link.send(&Message::Hello {
            version: PROTOCOL_VERSION,
            split_id: opts.split_id,
            token: opts.token.unwrap_or_default(),
            hidden_size: opts.hidden_size as u32,
            dtype: opts.dtype,
        })?;
        match link.next_message()? {
            Message::Welcome { session, max_context, middle_start, middle_end } => {
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
        let body = msg.encode();
        self.stats.bytes_up += body.len() as u64 + 4;
        self.up.send((Instant::now(), body)).map_err(|_| Error::invalid("the connection to the cloud is closed"))
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

    fn reply(&self, msg: Message) -> Result<MiddleReply> {
        match msg {
            Message::Middle { block, compute_us } => Ok(MiddleReply {
                start: block.start as usize,
                hidden: block.to_tensor(self.hidden_size, &Device::Cpu)?,
                cloud_compute: Duration::from_micros(compute_us),
            }),
            Message::Error { code, message } => Err(cloud_error(code, &message)),
            other => Err(Error::invalid(format!("unexpected message from the cloud: {other:?}"))),
        }
    }

    /// Sends a raw frame body (tests use it to send malformed frames).
    #[doc(hidden)]
    pub fn send_raw(&mut self, body: Vec<u8>) -> Result<()> {
        self.up.send((Instant::now(), body)).map_err(|_| Error::invalid("closed"))
    }
}

impl MiddleLink for QuicLink {
    fn submit(&mut self, start: usize, hidden: &Tensor) -> Result<()> {
        self.send(&Message::Hidden(HiddenBlock::from_tensor(hidden, start, self.dtype)?))
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
    fn drop(&mut self) {
        let _ = self.send(&Message::Close);
        if let Some(rt) = self.runtime.take() {
            let conn = self.connection.clone();
            rt.block_on(async {
                // Let the writer flush the Close frame, then close the connection.
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.close(0u32.into(), b"bye");
            });
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}
