//! Per-key rate limits: a token bucket of events for each ingest key.
//!
//! A request takes as many tokens as it holds events, all or nothing, so a
//! limited request appends nothing and its client can send it again as it
//! is after `Retry-After`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How fast each key may post.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained events a second.
    pub events_per_second: f64,
    /// Events a key may post at once (the bucket's size); also the largest
    /// request a key can ever send.
    pub burst: u64,
}

/// The command-line flags of [`RateLimit`], shared by the commands that
/// serve ingest (`run` and `ingest`).
#[derive(Debug, Clone, clap::Args)]
pub struct RateLimitArgs {
    /// Events a second each ingest key may post (a token bucket; unlimited
    /// by default). A request over it is answered 429 with `Retry-After`
    /// and appends nothing.
    #[arg(long, env = "TIDEMARK_RATE_LIMIT", value_name = "EVENTS_PER_SECOND")]
    pub rate_limit: Option<f64>,
    /// Events a key may post at once above its rate, and the largest
    /// request it may send (default: one second's worth).
    #[arg(
        long,
        env = "TIDEMARK_RATE_LIMIT_BURST",
        value_name = "EVENTS",
        requires = "rate_limit"
    )]
    pub rate_limit_burst: Option<u64>,
}

impl RateLimitArgs {
    /// The limit the flags ask for, if any; the error names the flag.
    pub fn limit(&self) -> Result<Option<RateLimit>, String> {
        self.rate_limit
            .map(|rate| RateLimit::new(rate, self.rate_limit_burst))
            .transpose()
            .map_err(|e| format!("--rate-limit: {e}"))
    }
}

impl RateLimit {
    /// A limit of `events_per_second` with `burst` (default: one second's
    /// worth, at least one event); refuses a rate that is not positive.
    pub fn new(events_per_second: f64, burst: Option<u64>) -> Result<RateLimit, String> {
        if !(events_per_second.is_finite() && events_per_second > 0.0) {
            return Err(format!(
                "the rate limit must be a positive number of events a second, not {events_per_second}"
            ));
        }
        let burst = burst.unwrap_or(events_per_second.ceil() as u64);
        if burst == 0 {
            return Err("the rate limit's burst must be at least 1 event".into());
        }
        Ok(RateLimit {
            events_per_second,
            burst,
        })
    }
}

/// Why a request may not go through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Enough tokens will be there after this long.
    Wait(Duration),
    /// More events than the bucket holds: never, as one request.
    OverBurst,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every key, by the key's index in the configuration.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: RateLimit,
    buckets: Mutex<Vec<Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit, keys: usize, now: Instant) -> Limiter {
        let full = || Bucket {
            tokens: limit.burst as f64,
            at: now,
        };
        Limiter {
            limit,
            buckets: Mutex::new((0..keys).map(|_| full()).collect()),
        }
    }

    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes `events` tokens from `key`'s bucket at `now`, or none.
    pub(crate) fn take(&self, key: usize, events: u64, now: Instant) -> Result<(), Refusal> {
        if events > self.limit.burst {
            return Err(Refusal::OverBurst);
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(bucket) = buckets.get_mut(key) else {
            // Keys are the configuration's; an unknown index is not limited.
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.limit.events_per_second).min(self.limit.burst as f64);
        bucket.at = bucket.at.max(now);
        let wanted = events as f64;
        if bucket.tokens >= wanted {
            bucket.tokens -= wanted;
            Ok(())
        } else {
            let missing = wanted - bucket.tokens;
            Err(Refusal::Wait(Duration::from_secs_f64(
                missing / self.limit.events_per_second,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u64, now: Instant) -> Limiter {
        Limiter::new(RateLimit::new(rate, Some(burst)).unwrap(), 2, now)
    }

    #[test]
    fn a_key_spends_its_burst_then_waits_for_the_rate() {
        let t0 = Instant::now();
        let l = limiter(10.0, 20, t0);
        assert_eq!(l.take(0, 15, t0), Ok(()));
        // 5 left; 10 more take half a second at 10/s.
        assert_eq!(
            l.take(0, 10, t0),
            Err(Refusal::Wait(Duration::from_millis(500)))
        );
        // The refused request took nothing.
        assert_eq!(l.take(0, 5, t0), Ok(()));
        assert_eq!(l.take(0, 10, t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let t0 = Instant::now();
        let l = limiter(1.0, 3, t0);
        assert_eq!(l.take(0, 3, t0), Ok(()));
        assert!(l.take(0, 1, t0).is_err());
        assert_eq!(l.take(1, 3, t0), Ok(()));
    }

    #[test]
    fn a_request_larger_than_the_burst_is_never_let_through() {
        let t0 = Instant::now();
        let l = limiter(100.0, 50, t0);
        assert_eq!(
            l.take(0, 51, t0 + Duration::from_secs(3600)),
            Err(Refusal::OverBurst)
        );
    }

    #[test]
    fn the_bucket_never_holds_more_than_the_burst() {
        let t0 = Instant::now();
        let l = limiter(1000.0, 10, t0);
        assert_eq!(l.take(0, 10, t0 + Duration::from_secs(60)), Ok(()));
        assert!(l.take(0, 1, t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn a_rate_that_is_not_positive_is_refused() {
        assert!(RateLimit::new(0.0, None).is_err());
        assert!(RateLimit::new(-1.0, None).is_err());
        assert!(RateLimit::new(f64::NAN, None).is_err());
        assert!(RateLimit::new(5.0, Some(0)).is_err());
        assert_eq!(RateLimit::new(2.5, None).unwrap().burst, 3);
    }
}
