//! Retry delays that double from a floor to a ceiling: what the background
//! writers (notes, notifications) wait between failed attempts. Pure.

use std::time::Duration;

/// Retry delays grow from `min` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay after one that was `delay`: twice as long, at most `max`.
    pub fn next(self, delay: Duration) -> Duration {
        (delay * 2).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let mut d = b.min;
        let mut seen = vec![];
        for _ in 0..4 {
            seen.push(d.as_millis());
            d = b.next(d);
        }
        assert_eq!(seen, [100, 200, 350, 350]);
    }
}
