//! A token bucket: `burst` tokens at most, refilled at `requests_per_second`, starting full.
//! Time is passed in, so the arithmetic is tested without sleeping.

use std::time::{Duration, Instant};

use crate::mesh::Bucket;

/// One token, in the bucket's units: nanotokens, so that a refill of `elapsed` nanoseconds at
/// `per_second` tokens per second is `elapsed * per_second` units, exactly (no float drift).
const TOKEN: u128 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u128,
    per_second: u128,
    tokens: u128,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: Bucket, now: Instant) -> TokenBucket {
        let capacity = u128::from(limit.capacity()) * TOKEN;
        TokenBucket {
            capacity,
            per_second: u128::from(limit.requests_per_second.max(1)),
            tokens: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        self.tokens = self
            .tokens
            .saturating_add(elapsed.saturating_mul(self.per_second))
            .min(self.capacity);
        self.updated = now;
    }

    /// Whether a token is there now; if not, how long until one will be.
    pub fn check(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= TOKEN {
            return Ok(());
        }
        let nanos = (TOKEN - self.tokens).div_ceil(self.per_second);
        Err(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// Takes a token that [`check`](Self::check) found (never below zero).
    pub fn take(&mut self) {
        self.tokens = self.tokens.saturating_sub(TOKEN);
    }

    /// Checks and takes in one step.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.check(now)?;
        self.take();
        Ok(())
    }

    /// Full again: the bucket says nothing a new one would not (so it may be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(requests_per_second: u32, burst: Option<u32>) -> Bucket {
        Bucket {
            requests_per_second,
            burst,
        }
    }

    #[test]
    fn a_burst_takes_exactly_the_capacity_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(10, Some(10)), t0);
        let served = (0..15).filter(|_| b.try_take(t0).is_ok()).count();
        assert_eq!(served, 10);
        // The next token comes 100 ms later, not before.
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_take(t0 + Duration::from_millis(99)).is_err());
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_err());
        // A whole second refills ten, never more than the burst.
        let later = t0 + Duration::from_secs(60);
        let served = (0..30).filter(|_| b.try_take(later).is_ok()).count();
        assert_eq!(served, 10);
    }

    #[test]
    fn burst_defaults_to_the_rate_and_may_differ_from_it() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(5, None), t0);
        assert_eq!((0..9).filter(|_| b.try_take(t0).is_ok()).count(), 5);
        let mut b = TokenBucket::new(bucket(1, Some(3)), t0);
        assert_eq!((0..9).filter(|_| b.try_take(t0).is_ok()).count(), 3);
        assert_eq!(b.try_take(t0).unwrap_err(), Duration::from_secs(1));
        // Half a second: half a token, still refused, and the wait says so.
        let half = t0 + Duration::from_millis(500);
        assert_eq!(b.try_take(half).unwrap_err(), Duration::from_millis(500));
    }

    #[test]
    fn check_does_not_take_and_full_is_reported() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(2, Some(1)), t0);
        assert!(b.is_full(t0));
        assert!(b.check(t0).is_ok());
        assert!(b.check(t0).is_ok());
        b.take();
        assert!(!b.is_full(t0));
        assert!(b.check(t0).is_err());
        assert!(b.is_full(t0 + Duration::from_millis(500)));
        // A huge rate neither overflows nor exceeds the burst.
        let mut b = TokenBucket::new(bucket(i32::MAX as u32, Some(2)), t0);
        let later = t0 + Duration::from_secs(3600 * 24 * 365);
        assert_eq!((0..5).filter(|_| b.try_take(later).is_ok()).count(), 2);
    }
}
