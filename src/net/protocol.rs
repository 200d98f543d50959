//! The wire protocol between `hat run-edge` and `hat serve-cloud` (ALPN `hat/1`).
//!
//! One long-lived bidirectional QUIC stream per session carries length-prefixed frames:
//! `u32 length (LE) | u8 kind | body`. Every frame is checked against explicit size limits, and
//! hidden-state frames against the session's hidden size and dtype. What crosses the network is
//! exactly: the handshake (protocol version, split id, token, hidden size, wire dtype; the
//! cloud's cost model and load back), hidden states with their start position and count, the
//! cloud's load with each reply, link probes (zero padding only, to measure round trip and
//! throughput), and errors. Never token ids, text, logits or probabilities.
//!
//! Version 2 added the cost model, the load and the probes; a version-1 peer is refused with an
//! error that names both versions.
//!
//! A `Hidden` frame for positions `start..start + count` tells the cloud to truncate its cache to
//! `start` first: that is how it learns how many drafted positions were accepted, with no extra
//! round trip.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::tree::MAX_TREE_NODES;
use crate::sched::{CloudModel, Regimes, StageCost};

/// The ALPN stays `hat/1` across protocol versions, so that a peer of another version gets the
/// handshake's error naming both versions instead of a bare TLS failure.
pub const ALPN: &[u8] = b"hat/1";
/// 3: draft trees (`Tree` blocks and the path kept of the previous one). 4: `Pending` frames
/// while a block waits in the cloud's queue. 5: `Tree` blocks that extend the previous tree.
pub const PROTOCOL_VERSION: u16 = 5;
/// How often the cloud tells an edge that its block is still queued or computing
/// ([`Message::Pending`]); well under the edge's shortest reply allowance
/// ([`crate::net::client::OVERDUE_MIN`]).
pub const PENDING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Largest probe padding either way (bytes).
pub const MAX_PROBE: usize = 8 << 20;
/// Largest frame either side accepts (bytes, kind byte included).
pub const MAX_FRAME: usize = 256 << 20;
/// Longest string field (split id, token, error message).
const MAX_STR: usize = 4096;

/// Bytes a `Hidden` frame adds to its payload: length prefix, kind, start, count, dtype.
pub const HIDDEN_FRAME_OVERHEAD: usize = 4 + 1 + 4 + 4 + 1;
/// Bytes a `Middle` frame adds to its payload (the same plus the compute time and the load).
pub const MIDDLE_FRAME_OVERHEAD: usize = HIDDEN_FRAME_OVERHEAD + 8 + CloudLoad::WIRE_SIZE;

/// How busy the cloud is, sent with the handshake and every reply.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct CloudLoad {
    /// Sessions open (this one included).
    pub sessions: u32,
    /// Other sessions computing, averaged over the last seconds (their compute time / wall
    /// time; sessions that closed do not count).
    pub busy: f32,
    /// Recent compute time per position (µs) of the other sessions; 0 when they computed none.
    pub us_per_row: f32,
    /// Recent compute time per block (ms) of the other sessions; 0 when they computed none.
    pub block_ms: f32,
}

impl CloudLoad {
    pub const WIRE_SIZE: usize = 16;
}

/// How hidden states are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    F32,
    F16,
    BF16,
}

impl WireDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            o => Err(Error::invalid(format!("wire dtype '{o}': expected f16, bf16 or f32"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self> {
        match c {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::BF16),
            o => Err(malformed(format!("unknown dtype code {o}"))),
        }
    }

    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// Rounds `x` as the wire would (identity for f32).
    pub fn round_trip(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::F32 => x.clone(),
            _ => x.to_dtype(self.dtype())?.to_dtype(x.dtype())?,
        })
    }
}

/// Error codes of [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    BadRequest = 1,
    VersionMismatch = 2,
    SplitMismatch = 3,
    Unauthorized = 4,
    Busy = 5,
    ContextTooLong = 6,
    Internal = 7,
    IdleTimeout = 8,
}

impl ErrorCode {
    /// The code's name, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::VersionMismatch => "VersionMismatch",
            Self::SplitMismatch => "SplitMismatch",
            Self::Unauthorized => "Unauthorized",
            Self::Busy => "Busy",
            Self::ContextTooLong => "ContextTooLong",
            Self::Internal => "Internal",
            Self::IdleTimeout => "IdleTimeout",
        }
    }

    fn from_u16(v: u16) -> Self {
        match v {
            2 => Self::VersionMismatch,
            3 => Self::SplitMismatch,
            4 => Self::Unauthorized,
            5 => Self::Busy,
            6 => Self::ContextTooLong,
            7 => Self::Internal,
            8 => Self::IdleTimeout,
            _ => Self::BadRequest,
        }
    }
}

/// Hidden states of `count` consecutive positions starting at `start`, as bytes in a wire dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenBlock {
    pub start: u32,
    pub count: u32,
    pub dtype: WireDtype,
    /// `count * hidden * dtype.size()` bytes, little endian, row-major `(count, hidden)`.
    pub data: Vec<u8>,
}

impl HiddenBlock {
    /// Encodes `x`, `(1, count, hidden)`, for positions from `start`.
    pub fn from_tensor(x: &Tensor, start: usize, dtype: WireDtype) -> Result<Self> {
        let (_, count, _) = x.dims3()?;
        let flat = x.flatten_all()?;
        let data: Vec<u8> = match dtype {
            WireDtype::F32 => flat.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WireDtype::F16 => flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WireDtype::BF16 => flat.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Ok(Self { start: start as u32, count: count as u32, dtype, data })
    }

    /// Decodes to an f32 tensor `(1, count, hidden)`.
    pub fn to_tensor(&self, hidden: usize, device: &Device) -> Result<Tensor> {
        self.check(hidden, self.dtype)?;
        let n = self.count as usize;
        let d = &self.data;
        let values: Vec<f32> = match self.dtype {
            WireDtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            WireDtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            WireDtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        Ok(Tensor::from_vec(values, (1, n, hidden), device)?)
    }

    /// Checks count, dtype and payload size against the session's settings.
    pub fn check(&self, hidden: usize, dtype: WireDtype) -> Result<()> {
        if self.count == 0 {
            return Err(malformed("hidden block with no positions"));
        }
        if self.dtype != dtype {
            return Err(malformed(format!("hidden block in {} but the session uses {}", self.dtype.name(), dtype.name())));
        }
        let want = self.count as usize * hidden * dtype.size();
        if self.data.len() != want {
            return Err(malformed(format!(
                "hidden block of {} positions has {} bytes, expected {want} (hidden size {hidden})",
                self.count,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Edge → cloud, first frame of a session.
    Hello { version: u16, split_id: String, token: String, hidden_size: u32, dtype: WireDtype },
    /// Cloud → edge: the session is open; the cloud's cost model and load.
    Welcome { session: u64, max_context: u32, middle_start: u32, middle_end: u32, cost: CloudModel, load: CloudLoad },
    /// Edge → cloud: run the middle layers on these positions (after truncating to `start`).
    Hidden(HiddenBlock),
    /// Edge → cloud: a block that forms a draft tree (`parents`: one per row, [`crate::model::tree::ROOT`] for the
    /// first; empty for a sequence) or follows one (`keep`: the rows of the previous block that
    /// verification accepted, root first; they move to consecutive positions before the block
    /// runs). When the first row's parent is not the root marker, the block extends the previous
    /// tree instead: its rows follow that tree's, each parent an earlier row of the whole tree,
    /// nothing kept, starting at the slot after the tree's last row
    /// ([`crate::model::tree::BlockCache::check`]). Only indices into blocks: no token, text,
    /// logit or probability.
    Tree { block: HiddenBlock, parents: Vec<u16>, keep: Vec<u16> },
    /// Cloud → edge: the middle layers' output for a `Hidden` or `Tree` block, the compute time
    /// and the load.
    Middle { block: HiddenBlock, compute_us: u64, load: CloudLoad },
    /// Cloud → edge: the block starting at `start` is queued or computing and the cloud's
    /// passes are advancing; sent every [`PENDING_INTERVAL`] while the block waits, so an edge
    /// behind a long queue tells a busy cloud from a gone or stuck one. Nothing but the block's
    /// start.
    Pending { start: u32 },
    /// Edge → cloud: a link probe of `padding.len()` zero bytes; answer with `echo` zero bytes.
    Probe { echo: u32, padding: Vec<u8> },
    /// Cloud → edge: the answer to a probe.
    ProbeEcho { padding: Vec<u8> },
    /// Either way: the request failed.
    Error { code: ErrorCode, message: String },
    /// Edge → cloud: the session ends.
    Close,
}

/// Kind bytes (public so tests can classify raw frames).
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const HIDDEN: u8 = 3;
    pub const MIDDLE: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const CLOSE: u8 = 6;
    pub const PROBE: u8 = 7;
    pub const PROBE_ECHO: u8 = 8;
    pub const TREE: u8 = 9;
    pub const PENDING: u8 = 10;
}

fn malformed(msg: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("malformed frame: {msg}"))
}

/// A string of at most [`MAX_STR`] bytes, cut on a character boundary.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let b = &s.as_bytes()[..end];
    out.extend((b.len() as u16).to_le_bytes());
    out.extend(b);
}

fn put_block(out: &mut Vec<u8>, b: &HiddenBlock) {
    out.extend(b.start.to_le_bytes());
    out.extend(b.count.to_le_bytes());
    out.push(b.dtype.code());
    out.extend(&b.data);
}

fn put_load(out: &mut Vec<u8>, l: &CloudLoad) {
    out.extend(l.sessions.to_le_bytes());
    out.extend(l.busy.to_le_bytes());
    out.extend(l.us_per_row.to_le_bytes());
    out.extend(l.block_ms.to_le_bytes());
}

fn put_cost(out: &mut Vec<u8>, c: &CloudModel) {
    for v in c.middle.coefficients() {
        out.extend(v.to_le_bytes());
    }
    out.extend((c.middle.regimes.matmul_rows as u32).to_le_bytes());
    out.extend((c.middle.regimes.attention_rows as u32).to_le_bytes());
    out.extend((c.middle.max_rows as u32).to_le_bytes());
    let n = c.slowdown.len().min(CloudModel::MAX_SLOWDOWN);
    out.push(n as u8);
    for v in &c.slowdown[..n] {
        out.extend((*v as f32).to_le_bytes());
    }
}

/// Probe padding: zeros only (nothing else may ride on a probe).
fn zero_padding(r: &mut Reader<'_>) -> Result<Vec<u8>> {
    let padding = r.take(r.b.len())?;
    if padding.len() > MAX_PROBE || padding.iter().any(|&b| b != 0) {
        return Err(malformed("probe padding must be at most 8 MiB of zero bytes"));
    }
    Ok(padding.to_vec())
}

/// A cursor over a frame body that fails cleanly on short input.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(malformed("frame ends early"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| malformed("u64"))?))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn load(&mut self) -> Result<CloudLoad> {
        let load = CloudLoad { sessions: self.u32()?, busy: self.f32()?, us_per_row: self.f32()?, block_ms: self.f32()? };
        if [load.busy, load.us_per_row, load.block_ms].iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(malformed("load figures must be finite and non-negative"));
        }
        Ok(load)
    }
    fn cost(&mut self) -> Result<CloudModel> {
        let mut coefficients = [0f64; crate::sched::cost::FEATURES];
        for c in coefficients.iter_mut() {
            *c = self.f64()?;
        }
        let regimes = Regimes { matmul_rows: self.u32()? as usize, attention_rows: self.u32()? as usize };
        let middle = StageCost::from_coefficients(coefficients, regimes, self.u32()? as usize);
        let n = self.u8()? as usize;
        if n > CloudModel::MAX_SLOWDOWN {
            return Err(malformed("too many slowdown entries"));
        }
        let slowdown = (0..n).map(|_| self.f32().map(f64::from)).collect::<Result<Vec<_>>>()?;
        if slowdown.iter().chain(coefficients.iter()).any(|v| !v.is_finite() || *v < 0.0) {
            return Err(malformed("cost figures must be finite and non-negative"));
        }
        Ok(CloudModel { middle, slowdown })
    }
    /// A u16 count and that many u16 row indices (at most [`MAX_TREE_NODES`]).
    fn indices(&mut self) -> Result<Vec<u16>> {
        let n = self.u16()? as usize;
        if n > MAX_TREE_NODES {
            return Err(malformed(format!("{n} tree rows (at most {MAX_TREE_NODES})")));
        }
        (0..n).map(|_| self.u16()).collect()
    }

    fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(malformed("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| malformed("string is not UTF-8"))
    }
    fn block(&mut self) -> Result<HiddenBlock> {
        let start = self.u32()?;
        let count = self.u32()?;
        let dtype = WireDtype::from_code(self.u8()?)?;
        let data = self.take(self.b.len())?.to_vec();
        Ok(HiddenBlock { start, count, dtype, data })
    }
    fn end(&self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!("{} trailing bytes", self.b.len())))
        }
    }
}

impl Message {
    /// The message's name (for errors that must not print a frame's contents).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Hidden(_) => "hidden states",
            Message::Tree { .. } => "tree of hidden states",
            Message::Middle { .. } => "middle states",
            Message::Pending { .. } => "pending",
            Message::Probe { .. } => "probe",
            Message::ProbeEcho { .. } => "probe echo",
            Message::Error { .. } => "error",
            Message::Close => "close",
        }
    }

    /// The frame body: kind byte and fields (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Hello { version, split_id, token, hidden_size, dtype } => {
                out.push(kind::HELLO);
                out.extend(version.to_le_bytes());
                put_str(&mut out, split_id);
                put_str(&mut out, token);
                out.extend(hidden_size.to_le_bytes());
                out.push(dtype.code());
            }
            Message::Welcome { session, max_context, middle_start, middle_end, cost, load } => {
                out.push(kind::WELCOME);
                out.extend(session.to_le_bytes());
                out.extend(max_context.to_le_bytes());
                out.extend(middle_start.to_le_bytes());
                out.extend(middle_end.to_le_bytes());
                put_cost(&mut out, cost);
                put_load(&mut out, load);
            }
            Message::Hidden(b) => {
                out.push(kind::HIDDEN);
                put_block(&mut out, b);
            }
            Message::Tree { block, parents, keep } => {
                out.push(kind::TREE);
                for list in [keep, parents] {
                    out.extend((list.len() as u16).to_le_bytes());
                    list.iter().for_each(|v| out.extend(v.to_le_bytes()));
                }
                put_block(&mut out, block);
            }
            Message::Middle { block, compute_us, load } => {
                out.push(kind::MIDDLE);
                out.extend(compute_us.to_le_bytes());
                put_load(&mut out, load);
                put_block(&mut out, block);
            }
            Message::Pending { start } => {
                out.push(kind::PENDING);
                out.extend(start.to_le_bytes());
            }
            Message::Probe { echo, padding } => {
                out.push(kind::PROBE);
                out.extend(echo.to_le_bytes());
                out.extend(padding);
            }
            Message::ProbeEcho { padding } => {
                out.push(kind::PROBE_ECHO);
                out.extend(padding);
            }
            Message::Error { code, message } => {
                out.push(kind::ERROR);
                out.extend((*code as u16).to_le_bytes());
                put_str(&mut out, message);
            }
            Message::Close => out.push(kind::CLOSE),
        }
        out
    }

    /// Parses a frame body.
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader { b: body };
        let msg = match r.u8()? {
            kind::HELLO => Message::Hello {
                version: r.u16()?,
                split_id: r.str()?,
                token: r.str()?,
                hidden_size: r.u32()?,
                dtype: WireDtype::from_code(r.u8()?)?,
            },
            kind::WELCOME => Message::Welcome {
                session: r.u64()?,
                max_context: r.u32()?,
                middle_start: r.u32()?,
                middle_end: r.u32()?,
                cost: r.cost()?,
                load: r.load()?,
            },
            kind::HIDDEN => Message::Hidden(r.block()?),
            kind::TREE => {
                let keep = r.indices()?;
                let parents = r.indices()?;
                let block = r.block()?;
                if !parents.is_empty() && parents.len() != block.count as usize {
                    return Err(malformed(format!("a tree of {} parents for a block of {} positions", parents.len(), block.count)));
                }
                Message::Tree { block, parents, keep }
            }
            kind::MIDDLE => {
                let compute_us = r.u64()?;
                let load = r.load()?;
                Message::Middle { compute_us, load, block: r.block()? }
            }
            kind::PENDING => Message::Pending { start: r.u32()? },
            kind::PROBE => {
                let echo = r.u32()?;
                if echo as usize > MAX_PROBE {
                    return Err(malformed("probe echo larger than 8 MiB"));
                }
                Message::Probe { echo, padding: zero_padding(&mut r)? }
            }
            kind::PROBE_ECHO => Message::ProbeEcho { padding: zero_padding(&mut r)? },
            kind::ERROR => Message::Error { code: ErrorCode::from_u16(r.u16()?), message: r.str()? },
            kind::CLOSE => Message::Close,
            k => return Err(malformed(format!("unknown frame kind {k}"))),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Writes one length-prefixed frame.
pub async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<()> {
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend((body.len() as u32).to_le_bytes());
    buf.extend(body);
    send.write_all(&buf).await.map_err(|e| Error::invalid(format!("connection lost while sending: {e}")))
}

/// Reads one length-prefixed frame body; `Ok(None)` at a clean end of stream.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Vec<u8>>> {
    read_frame_by(recv, max, None).await
}

/// The slowest a frame's body may arrive once its length is known, bytes per second (0.8
/// Mbit/s; with `grace` on top).
pub const MIN_FRAME_RATE: f64 = 100_000.0;

/// [`read_frame`] where a frame, once started, must arrive within `grace` plus its size at
/// [`MIN_FRAME_RATE`] (`None`: no deadline): a peer that starts a frame and stalls does not hold
/// the reader until an idle timeout.
pub async fn read_frame_by(recv: &mut quinn::RecvStream, max: usize, grace: Option<std::time::Duration>) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(Error::invalid(format!("connection lost while receiving: {e}"))),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > max {
        return Err(malformed(format!("frame of {n} bytes (limit {max})")));
    }
    let mut body = vec![0u8; n];
    let read = recv.read_exact(&mut body);
    match grace {
        None => read.await.map_err(|e| Error::invalid(format!("connection lost mid-frame: {e}")))?,
        Some(grace) => {
            let deadline = grace + std::time::Duration::from_secs_f64(n as f64 / MIN_FRAME_RATE);
            match tokio::time::timeout(deadline, read).await {
                Ok(r) => r.map_err(|e| Error::invalid(format!("connection lost mid-frame: {e}")))?,
                Err(_) => return Err(malformed(format!("a frame of {n} bytes did not arrive within {deadline:.1?}"))),
            }
        }
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let x = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((1, 3, 4)).unwrap();
        let load = CloudLoad { sessions: 3, busy: 0.5, us_per_row: 1234.5, block_ms: 40.0 };
        for dtype in [WireDtype::F32, WireDtype::F16, WireDtype::BF16] {
            let block = HiddenBlock::from_tensor(&x, 7, dtype).unwrap();
            assert_eq!(block.data.len(), 12 * dtype.size());
            assert_eq!(Message::Hidden(block.clone()).encode().len() + 4, block.data.len() + HIDDEN_FRAME_OVERHEAD);
            let m = Message::Middle { block: block.clone(), compute_us: 1, load: CloudLoad::default() };
            assert_eq!(m.encode().len() + 4, block.data.len() + MIDDLE_FRAME_OVERHEAD);
            let back = block.to_tensor(4, &Device::Cpu).unwrap();
            assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(block.to_tensor(5, &Device::Cpu).is_err(), "hidden size is checked");
            // A long message is cut on a character boundary and still decodes.
            let long = Message::Error { code: ErrorCode::Internal, message: "é".repeat(MAX_STR) };
            match Message::decode(&long.encode()).unwrap() {
                Message::Error { message, .. } => assert!(message.len() <= MAX_STR && message.chars().all(|c| c == 'é')),
                other => panic!("{other:?}"),
            }
            let tree = Message::Tree { block: block.clone(), parents: vec![crate::model::tree::ROOT, 0, 0], keep: vec![0, 2] };
            assert_eq!(Message::decode(&tree.encode()).unwrap(), tree);
            let mut lopsided = tree.encode();
            lopsided[1 + 2 + 4..1 + 2 + 4 + 2].copy_from_slice(&2u16.to_le_bytes());
            assert!(Message::decode(&lopsided).is_err(), "parents and rows must agree");
            for m in [Message::Hidden(block.clone()), Message::Middle { block: block.clone(), compute_us: 9, load }] {
                assert_eq!(Message::decode(&m.encode()).unwrap(), m);
            }
        }
        let hello = Message::Hello { version: 1, split_id: "abc".into(), token: "t".into(), hidden_size: 576, dtype: WireDtype::F16 };
        assert_eq!(Message::decode(&hello.encode()).unwrap(), hello);
        let cost = CloudModel { middle: StageCost::from_coefficients([0.5, 1.75, 0.0001, 0.001, 0.003, 20.0], Regimes { matmul_rows: 12, attention_rows: 21 }, 512), slowdown: vec![1.0, 1.5, 2.25] };
        let welcome = Message::Welcome { session: 7, max_context: 4096, middle_start: 2, middle_end: 28, cost, load: CloudLoad { sessions: 1, ..Default::default() } };
        assert_eq!(Message::decode(&welcome.encode()).unwrap(), welcome);
        for m in [Message::Probe { echo: 100, padding: vec![0; 5000] }, Message::ProbeEcho { padding: vec![0; 3] }] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        // A probe carries zeros only, and bounded echoes.
        let mut dirty = Message::Probe { echo: 0, padding: vec![0; 8] }.encode();
        dirty[7] = 1;
        assert!(Message::decode(&dirty).is_err());
        assert!(Message::decode(&Message::Probe { echo: u32::MAX, padding: vec![] }.encode()).is_err());
        let mut nan = Message::Middle { block: HiddenBlock::from_tensor(&x, 0, WireDtype::F32).unwrap(), compute_us: 1, load }.encode();
        nan[13..17].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(Message::decode(&nan).is_err(), "a NaN load is refused");
        let err = Message::Error { code: ErrorCode::Busy, message: "full".into() };
        assert_eq!(Message::decode(&err.encode()).unwrap(), err);
        assert!(Message::decode(&[]).is_err());
        assert!(Message::decode(&[99]).is_err());
        assert!(Message::decode(&[kind::HELLO, 1]).is_err());
        let mut long = Message::Close.encode();
        long.push(0);
        assert!(Message::decode(&long).is_err());
    }
}
