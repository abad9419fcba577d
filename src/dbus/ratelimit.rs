//! A small rate limiter for log lines a caller can trigger at will (refused D-Bus calls):
//! at most `burst` lines per `window`, then one line saying how many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(window: Duration, burst: u32) -> RateLimit {
        RateLimit {
            window,
            burst,
            state: Mutex::new(State {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log now: `Some(n)` with the number of lines left out since the last one
    /// logged, `None` to stay quiet.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.start.is_none_or(|t| now.duration_since(t) >= self.window) {
            s.start = Some(now);
            s.used = 0;
        }
        if s.used >= self.burst {
            s.suppressed += 1;
            return None;
        }
        s.used += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_quiet_then_a_count() {
        let r = RateLimit::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let got: Vec<Option<u64>> = (0..6).map(|_| r.check(t0)).collect();
        assert_eq!(got, vec![Some(0), Some(0), Some(0), None, None, None]);
        assert_eq!(r.check(t0 + Duration::from_secs(9)), None);
        // A new window: logged again, with how many were left out.
        assert_eq!(r.check(t0 + Duration::from_secs(10)), Some(4));
        assert_eq!(r.check(t0 + Duration::from_secs(10)), Some(0));
    }
}
