//! Stop strings in a stream of text deltas.
//!
//! Text that might be the start of a stop string is held back until it is known not to be:
//! a client never sees part of a stop string, and the concatenated deltas equal the final text.

/// Finds stop strings in a stream of text deltas.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    /// Text received but not yet released.
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include_stop,
            pending: String::new(),
        }
    }

    /// Adds `delta`; returns the text that can be released now and, when a stop string
    /// matched, that string (the sequence then ends; nothing after it is released). Without
    /// stop strings `delta` itself is returned, not a copy.
    pub fn push(&mut self, delta: String) -> (String, Option<String>) {
        if self.stops.is_empty() {
            return (delta, None);
        }
        self.pending.push_str(&delta);
        // The earliest match wins; among matches at one place, the longest.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, s)| (at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = hit {
            let end = if self.include_stop {
                at + stop.len()
            } else {
                at
            };
            let out = self.pending[..end].to_string();
            let stop = stop.clone();
            self.pending.clear();
            return (out, Some(stop));
        }
        let hold = self.longest_partial_suffix();
        let release = self.pending.len() - hold;
        let out = self.pending[..release].to_string();
        self.pending.drain(..release);
        (out, None)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(p.len());
            for len in (best + 1..=max).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && s.as_bytes().starts_with(&p.as_bytes()[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    /// Releases whatever was held back (the sequence ended another way).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], include: bool, deltas: &[&str]) -> (Vec<String>, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = Vec::new();
        for d in deltas {
            let (text, hit) = m.push(d.to_string());
            out.push(text);
            if hit.is_some() {
                return (out, hit);
            }
        }
        out.push(m.flush());
        (out, None)
    }

    #[test]
    fn holds_back_a_partial_stop_and_cuts_at_the_match() {
        let (out, hit) = run(&["END"], false, &["abc E", "N", "D more"]);
        assert_eq!(out, ["abc ", "", ""]);
        assert_eq!(hit.as_deref(), Some("END"));
    }

    #[test]
    fn releases_a_false_alarm() {
        let (out, hit) = run(&["END"], false, &["abc E", "NX", "y"]);
        assert_eq!(out.concat(), "abc ENXy");
        assert_eq!(out[0], "abc ");
        assert_eq!(hit, None);
    }

    #[test]
    fn includes_the_stop_when_asked_and_picks_the_earliest() {
        let (out, hit) = run(&["b", "xa"], true, &["xab"]);
        assert_eq!(out.concat(), "xa");
        assert_eq!(hit.as_deref(), Some("xa"));
    }

    #[test]
    fn multibyte_boundaries() {
        let (out, hit) = run(&["é!"], false, &["café", " ok"]);
        assert_eq!(out.concat(), "café ok");
        assert_eq!(hit, None);
    }
}
