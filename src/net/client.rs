//! [`QuicLink`]: the edge's session with `hat serve-cloud` over QUIC, optionally through an
//! emulated link, with every frame shown to a [`FrameTap`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::net::emulation::{LinkEmulation, Pipe};
use crate::net::link::{Direction, FrameTap, LinkStats, MiddleLink, MiddleReply};
use crate::net::protocol::{read_frame, write_frame, ErrorCode, HiddenBlock, Message, WireDtype, MAX_FRAME, PROTOCOL_VERSION};
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
        let tls = crate::net::tls::client_config(&opts.trust)?;
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
                .connect(opts.addr, crate::net::tls::SERVER_NAME)
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

    /// Sends a frame body as it is (tests use it to send malformed frames); [`Self::send`]
    /// sends encoded messages through it.
    #[doc(hidden)]
    pub fn send_raw(&mut self, body: Vec<u8>) -> Result<()> {
        self.stats.bytes_up += body.len() as u64 + 4;
        self.up.send((Instant::now(), body)).map_err(|_| Error::invalid("the connection to the cloud is closed"))
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
