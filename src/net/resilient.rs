//! [`ResilientLink`]: a session with the cloud that survives losing the cloud.
//!
//! Every block frame sent in the session is kept (the hidden states of every position, drafts
//! included, with their original block boundaries and tree links). When the connection drops,
//! a reply is overdue ([`QuicLink::reply_deadline`]) or a send fails, the link opens a session
//! with the same cloud or the next of its addresses and sends the kept frames again, in order:
//! the new session computes every row exactly as the lost one did (the same blocks, the same
//! bytes), so its middle cache is the lost one's and the generation goes on as if nothing had
//! happened. The replies to blocks already answered are read and dropped; the ones still awaited
//! are delivered as usual.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{CloudFailure, Error, Result};
use crate::net::client::{block_message, ConnectOptions, QuicLink};
use crate::net::link::{LinkStats, MiddleLink, MiddleReply};
use crate::net::protocol::Message;

/// Pause between rounds of attempts when no cloud answered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A block frame as it was sent.
struct Sent {
    start: usize,
    count: usize,
    frame: Message,
}

/// A cloud session that reconnects and replays (see the module doc).
pub struct ResilientLink {
    /// The clouds, tried in order (the current one first when reconnecting).
    clouds: Vec<ConnectOptions>,
    current: usize,
    link: QuicLink,
    sent: Vec<Sent>,
    /// Replies delivered to the caller (they answer `sent[..answered]`).
    answered: usize,
    /// How long to keep trying to reach a cloud after losing one (zero: never reconnect).
    cloud_timeout: Duration,
    /// Bytes of the sessions that were lost, reconnections and the time lost to them (waiting
    /// for the reply that showed the loss, finding a cloud, replaying).
    carried: LinkStats,
}

/// Whether another cloud session may help.
fn recoverable(e: &Error) -> bool {
    matches!(e.cloud_failure(), Some(CloudFailure::Lost | CloudFailure::Unreachable | CloudFailure::Busy))
}

impl ResilientLink {
    /// Opens a session with the first of `clouds` that accepts one (each within its connect
    /// timeout; a cloud that refuses the session for good, e.g. another split, is an error at
    /// once). `cloud_timeout` bounds each later recovery.
    pub fn connect(clouds: Vec<ConnectOptions>, cloud_timeout: Duration) -> Result<Self> {
        let mut last = Error::invalid("no cloud address given");
        for (i, opts) in clouds.iter().enumerate() {
            match QuicLink::connect(opts.clone()) {
                Ok(link) => return Ok(Self { clouds, current: i, link, sent: Vec::new(), answered: 0, cloud_timeout, carried: LinkStats::default() }),
                Err(e) if recoverable(&e) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The session now open (for probes and the handshake's figures).
    pub fn session(&mut self) -> &mut QuicLink {
        &mut self.link
    }

    /// Finds a cloud again after `cause` and replays the session there; an error when none
    /// could be reached within the cloud timeout.
    fn recover(&mut self, cause: Error) -> Result<()> {
        if self.cloud_timeout.is_zero() {
            return Err(cause);
        }
        let began = Instant::now();
        let deadline = began + self.cloud_timeout;
        let mut last = cause.to_string();
        let mut attempt = 0usize;
        while Instant::now() < deadline {
            // The other clouds in turn, then the one that was lost (it may be back).
            let i = (self.current + 1 + attempt) % self.clouds.len();
            attempt += 1;
            let mut opts = self.clouds[i].clone();
            opts.connect_timeout = opts.connect_timeout.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_millis(100));
            let replayed = QuicLink::connect(opts).and_then(|mut link| match self.replay(&mut link) {
                Ok(()) => Ok(link),
                Err(e) => {
                    // A cloud that failed the replay is not waited for.
                    link.abandon();
                    Err(e)
                }
            });
            match replayed {
                Ok(link) => {
                    let old = std::mem::replace(&mut self.link, link);
                    let s = old.stats();
                    old.abandon();
                    self.carried.bytes_up += s.bytes_up;
                    self.carried.bytes_down += s.bytes_down;
                    self.carried.pending_notices += s.pending_notices;
                    self.carried.reconnects += 1;
                    self.carried.recovery += began.elapsed();
                    self.current = i;
                    return Ok(());
                }
                Err(e) if recoverable(&e) => last = e.to_string(),
                Err(e) => return Err(e),
            }
            if attempt % self.clouds.len() == 0 {
                std::thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
            }
        }
        Err(Error::cloud(CloudFailure::Unreachable, format!("lost the cloud ({cause}) and reached none within {:.1} s (last: {last})", self.cloud_timeout.as_secs_f64())))
    }

    /// Sends every block of the session again on `link`, and reads and drops the replies the
    /// caller already has.
    fn replay(&self, link: &mut QuicLink) -> Result<()> {
        for s in &self.sent {
            link.submit_message(s.start, s.count, &s.frame)?;
        }
        for _ in 0..self.answered {
            link.receive()?;
        }
        Ok(())
    }
}

impl MiddleLink for ResilientLink {
    fn predicted_compute_ms(&self, rows: usize, start: usize) -> Option<f64> {
        self.link.predicted_compute_ms(rows, start)
    }

    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()> {
        let (count, frame) = block_message(start, hidden, parents, keep, self.link.dtype())?;
        let sent = self.link.submit_message(start, count, &frame);
        // Kept first: a recovery replays it with the others.
        self.sent.push(Sent { start, count, frame });
        match sent {
            Err(e) if recoverable(&e) => self.recover(e),
            other => other,
        }
    }

    fn receive(&mut self) -> Result<MiddleReply> {
        loop {
            let waiting = Instant::now();
            match self.link.receive() {
                Ok(r) => {
                    self.answered += 1;
                    return Ok(r);
                }
                Err(e) if recoverable(&e) => {
                    // The wait for a reply that never came is lost time too.
                    self.carried.recovery += waiting.elapsed();
                    self.recover(e)?
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        match self.link.try_receive() {
            Ok(Some(r)) => {
                self.answered += 1;
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) if recoverable(&e) => self.recover(e).map(|()| None),
            Err(e) => Err(e),
        }
    }

    fn stats(&self) -> LinkStats {
        let s = self.link.stats();
        LinkStats {
            bytes_up: s.bytes_up + self.carried.bytes_up,
            bytes_down: s.bytes_down + self.carried.bytes_down,
            pending_notices: s.pending_notices + self.carried.pending_notices,
            ..self.carried
        }
    }
}
