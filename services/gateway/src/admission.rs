//! Admission control: what the gateway accepts, decided at once. A request past the in-flight
//! limit is refused with `overloaded` (503) and past its API key's rate with
//! `rate_limit_exceeded` (429), both with `Retry-After`, instead of waiting until it times out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use preble_protocol::ErrorCode;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Limits of what the gateway accepts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionLimits {
    /// Requests admitted and not yet ended (being prepared, queued, running, streaming).
    pub max_in_flight: usize,
    /// Requests per second each API key may start (all clients together when no keys are
    /// configured); 0 means unlimited.
    pub rate_per_s: f64,
    /// Requests a key may start at once above its rate.
    pub burst: f64,
}

/// Decides which requests are admitted.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    limits: AdmissionLimits,
    in_flight: AtomicUsize,
    buckets: Mutex<HashMap<String, Bucket>>,
    metrics: Metrics,
}

/// A token bucket: `tokens` requests may start now; it refills at the rate up to the burst.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// An admitted request; it stops counting as in flight when dropped.
pub struct Admitted {
    inner: Arc<Inner>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let left = self.inner.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        self.inner.metrics.in_flight.set(left as i64);
    }
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: AdmissionLimits, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                in_flight: AtomicUsize::new(0),
                buckets: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// Admits a request of `key` (the authenticated API key, `None` when the gateway has no
    /// keys), or refuses it with how long to wait.
    pub fn admit(&self, key: Option<&str>) -> Result<Admitted, ApiError> {
        self.take_rate(key.unwrap_or(""), Instant::now())?;
        let before = self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let admitted = Admitted {
            inner: self.inner.clone(),
        };
        self.inner.metrics.in_flight.set(before as i64 + 1);
        if before >= self.inner.limits.max_in_flight {
            self.inner
                .metrics
                .refused
                .with_label_values(&["overloaded"])
                .inc();
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "the server is at its limit of {} requests in flight; retry shortly",
                    self.inner.limits.max_in_flight
                ),
            )
            .retry_after(Duration::from_secs(1)));
        }
        Ok(admitted)
    }

    /// Takes one request from `key`'s bucket, or says when one will be there.
    fn take_rate(&self, key: &str, now: Instant) -> Result<(), ApiError> {
        let limits = self.inner.limits;
        if limits.rate_per_s <= 0.0 {
            return Ok(());
        }
        let burst = limits.burst.max(1.0);
        let mut buckets = self
            .inner
            .buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * limits.rate_per_s;
        bucket.tokens = (bucket.tokens + refilled).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / limits.rate_per_s;
        self.inner
            .metrics
            .refused
            .with_label_values(&["rate_limited"])
            .inc();
        Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "rate limit of {} requests/s (burst {burst}) reached; retry in {wait:.1} s",
                limits.rate_per_s
            ),
        )
        .retry_after(Duration::from_secs_f64(wait)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_in_flight: usize, rate_per_s: f64, burst: f64) -> Admission {
        Admission::new(
            AdmissionLimits {
                max_in_flight,
                rate_per_s,
                burst,
            },
            Metrics::new(),
        )
    }

    #[test]
    fn in_flight_requests_are_capped_and_freed_when_they_end() {
        let a = admission(2, 0.0, 0.0);
        let first = a.admit(None).unwrap();
        let _second = a.admit(None).unwrap();
        let refused = a.admit(None).err().unwrap();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        drop(first);
        assert!(a.admit(None).is_ok());
    }

    #[test]
    fn each_key_has_its_own_bucket_that_refills_at_the_rate() {
        let a = admission(100, 2.0, 2.0);
        let t0 = Instant::now();
        assert!(a.take_rate("k1", t0).is_ok());
        assert!(a.take_rate("k1", t0).is_ok());
        let refused = a.take_rate("k1", t0).unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        let wait = refused.retry_after.unwrap();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert!(a.take_rate("k2", t0).is_ok(), "another key is not limited");
        assert!(a.take_rate("k1", t0 + Duration::from_millis(500)).is_ok());
        assert!(a.take_rate("k1", t0 + Duration::from_millis(500)).is_err());
    }
}
