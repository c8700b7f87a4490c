//! Per-gateway token buckets for `POST /api/v1/ingest` (`[ingest]
//! rate_limit_batches_per_s`, `burst`). In memory, per hub instance: with
//! several instances behind a load balancer each enforces its own limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets of more gateways than this are pruned of full (idle) buckets.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per gateway id: `burst` tokens, refilled at `rate` per
/// second; each batch takes one.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` > 0 batches per second, `burst` ≥ 1 (validated by the config).
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `gateway_id` at `now`; when none is left, returns
    /// how long until one is.
    pub fn check(&self, gateway_id: &str, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means another request panicked mid-update;
        // the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(gateway_id.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now.max(b.at);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_gateway() {
        let l = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check("a", t0).unwrap();
        }
        let wait = l.check("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another gateway has its own bucket.
        l.check("b", t0).unwrap();
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        l.check("a", t1).unwrap();
        assert!(l.check("a", t1).is_err());
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            l.check("a", t2).unwrap();
        }
        assert!(l.check("a", t2).is_err());
    }

    #[test]
    fn slow_rates_wait_long() {
        let l = RateLimiter::new(0.1, 1);
        let t0 = Instant::now();
        l.check("a", t0).unwrap();
        assert_eq!(l.check("a", t0).unwrap_err(), Duration::from_secs(10));
    }
}
