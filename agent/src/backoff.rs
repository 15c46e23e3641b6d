//! The agent's one retry policy: exponential, with jitter so that the agents of a whole
//! cluster do not retry in step after the control plane comes back, capped, and reset after a
//! success. Every reconnect and retry loop (discovery, join, node and workload certificate
//! renewal) uses it.
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays between attempts: from `min`, doubling up to `max`, each plus a random part of up
/// to itself (so a delay lies in `[d, 2d)`, never above `2 * max`).
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= min && delays[0] < min * 2, "{delays:?}");
        assert!(delays.iter().all(|d| *d < max * 2), "{delays:?}");
        assert!(delays[11] >= max, "{delays:?}");
        // Jittered: two agents starting together do not wait the same.
        let mut other = Backoff::new(min, max);
        let others: Vec<Duration> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(delays, others);
        backoff.reset();
        assert!(backoff.next_delay() < min * 2);
    }
}
