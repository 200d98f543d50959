//! Stop sequences over streamed text: what may be shown now, and where the answer ends.

/// Follows the generated text piece by piece. Text that could still turn out to be the start of
/// a stop sequence is held back; once a stop sequence appears the answer ends before it, and
/// the stop sequence itself is never shown (as OpenAI's API does).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Self::default() }
    }

    /// Adds a piece of text; returns what can be shown now, and whether a stop sequence ended
    /// the answer (then nothing more is released).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        // A stop sequence can only begin in the held-back tail or the new piece.
        let search_from = self.released;
        self.text.push_str(piece);
        let first_stop = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i)).min();
        if let Some(end) = first_stop {
            self.stopped = true;
            self.text.truncate(end);
            return (self.release_to(end), true);
        }
        let held = self.stops.iter().map(|s| partial_suffix(&self.text[search_from..], s)).max().unwrap_or(0);
        let end = self.text.len() - held;
        (self.release_to(end), false)
    }

    /// The text held back at the end of the answer (no stop sequence came).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let end = self.text.len();
        self.release_to(end)
    }

    /// The answer so far (without any stop sequence).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn release_to(&mut self, end: usize) -> String {
        let piece = self.text[self.released..end].to_string();
        self.released = end;
        piece
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, on character
/// boundaries.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.is_char_boundary(text.len() - n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (shown, s) = m.push(p);
            out.push(shown);
            if s {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(m.finish());
        }
        (out, stopped, m.text().to_string())
    }

    #[test]
    fn text_without_stops_passes_through() {
        let (out, stopped, text) = run(&[], &["Hel", "lo", " world"]);
        assert_eq!(out, ["Hel", "lo", " world", ""]);
        assert!(!stopped);
        assert_eq!(text, "Hello world");
    }

    #[test]
    fn a_stop_split_across_pieces_is_held_back_then_cut() {
        let (out, stopped, text) = run(&["\nUser:"], &["Sure.", "\nUs", "er:", " more"]);
        assert_eq!(out, ["Sure.", "", ""]);
        assert!(stopped);
        assert_eq!(text, "Sure.");
    }

    #[test]
    fn a_false_start_is_released_when_it_diverges() {
        let (out, stopped, _) = run(&["END"], &["the E", "ND", "x"]);
        assert_eq!(out, ["the ", ""]);
        assert!(stopped);
        let (out, stopped, text) = run(&["END"], &["the E", "nd"]);
        assert_eq!(out, ["the ", "End", ""]);
        assert!(!stopped);
        assert_eq!(text, "the End");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        let (out, stopped, text) = run(&["cd", "b"], &["a", "bcd"]);
        assert_eq!(out, ["a", ""]);
        assert!(stopped);
        assert_eq!(text, "a");
        let (out, _, _) = run(&["ü!"], &["grüß", "e ü", "?"]);
        assert_eq!(out.concat(), "grüße ü?");
    }
}
