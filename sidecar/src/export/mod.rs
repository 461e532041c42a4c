//! Export: OTLP gRPC exporters, the default local OTLP-JSON sink and the live terminal summary,
//! plus the rate-limited logging their failures go through.

use std::fmt::Display;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub mod batch;
pub mod config;
pub mod otlp;
pub mod sink;
pub mod stats;
pub mod summary;

/// Minimum time between two logged export failures of one exporter.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Logs a recurring failure at most once per interval, counting the occurrences in between.
#[derive(Debug)]
pub struct LogLimiter {
    what: &'static str,
    interval: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    last: Option<Instant>,
    suppressed: u64,
    total: u64,
}

impl LogLimiter {
    /// A limiter for failures of `what` (e.g. `"OTLP span export"`).
    pub fn new(what: &'static str, interval: Duration) -> Self {
        Self {
            what,
            interval,
            state: Mutex::new(LimiterState::default()),
        }
    }

    /// Records one failure; logs it (with the number suppressed since the last log) unless
    /// one was logged less than the interval ago. Returns whether it was logged.
    pub fn failed(&self, error: &dyn Display) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.total += 1;
        let now = Instant::now();
        if s.last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            s.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut s.suppressed);
        s.last = Some(now);
        let total = s.total;
        drop(s);
        tracing::warn!(
            suppressed,
            total_failures = total,
            "{} failed: {error} (logged at most every {}s)",
            self.what,
            self.interval.as_secs()
        );
        true
    }

    /// Failures recorded so far.
    pub fn total(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_logs_first_then_suppresses() {
        let l = LogLimiter::new("test export", Duration::from_secs(3600));
        assert!(l.failed(&"boom"));
        assert!(!l.failed(&"boom"));
        assert!(!l.failed(&"boom"));
        assert_eq!(l.total(), 3);
        let l = LogLimiter::new("test export", Duration::ZERO);
        assert!(l.failed(&"a"));
        assert!(l.failed(&"b"));
    }
}
