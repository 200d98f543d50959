//! What every generation loop measures the same way: when its tokens came (TTFT, TBT), and the
//! checks a prompt must pass before any work starts.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The clock of one generation: started when the prompt is submitted, read at each token.
#[derive(Debug, Clone, Copy)]
pub struct TokenClock {
    start: Instant,
    first: Option<Instant>,
    last: Instant,
    tokens: usize,
}

impl TokenClock {
    /// The prompt is submitted now.
    pub fn start() -> Self {
        let now = Instant::now();
        Self { start: now, first: None, last: now, tokens: 0 }
    }

    /// A generated token is known now.
    pub fn token(&mut self) {
        self.last = Instant::now();
        self.first.get_or_insert(self.last);
        self.tokens += 1;
    }

    /// Prompt submitted → first token known (0 without tokens).
    pub fn ttft_ms(&self) -> f64 {
        self.first.map_or(0.0, |f| ms(f - self.start))
    }

    /// Mean time between consecutive tokens (0 with fewer than two).
    pub fn tbt_ms(&self) -> f64 {
        match self.first {
            Some(f) if self.tokens > 1 => ms(self.last - f) / (self.tokens - 1) as f64,
            _ => 0.0,
        }
    }
}

/// A prompt must have a token, and leave room for one more after the `held` positions already in
/// a context of `limit` positions.
pub fn check_prompt(prompt: &[u32], held: usize, limit: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty (no tokens to start from)"));
    }
    if held + prompt.len() >= limit {
        return Err(Error::ContextTooLong { needed: held + prompt.len() + 1, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_must_fit_with_room_for_a_token() {
        assert!(check_prompt(&[], 0, 10).unwrap_err().to_string().contains("empty"));
        assert!(check_prompt(&[1; 9], 0, 10).is_ok());
        match check_prompt(&[1; 5], 5, 10) {
            Err(Error::ContextTooLong { needed, limit }) => assert_eq!((needed, limit), (11, 10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_clock_reads_ttft_and_the_mean_gap() {
        let mut c = TokenClock::start();
        assert_eq!((c.ttft_ms(), c.tbt_ms()), (0.0, 0.0));
        std::thread::sleep(Duration::from_millis(5));
        c.token();
        assert!(c.ttft_ms() >= 5.0 && c.tbt_ms() == 0.0);
        std::thread::sleep(Duration::from_millis(4));
        c.token();
        std::thread::sleep(Duration::from_millis(4));
        c.token();
        // Two gaps of at least 4 ms each.
        assert!(c.tbt_ms() >= 4.0, "{}", c.tbt_ms());
    }
}
