//! Per-tenant rate (token bucket) and concurrency limits. The state outlives config reloads:
//! a tenant keeps its bucket and its in-flight count when the config is reloaded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::RateLimit;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Runtime state of one tenant.
#[derive(Debug)]
pub struct TenantState {
    bucket: Mutex<Bucket>,
    in_flight: AtomicUsize,
}

impl Default for TenantState {
    fn default() -> Self {
        TenantState {
            bucket: Mutex::new(Bucket {
                tokens: f64::INFINITY,
                last: Instant::now(),
            }),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Holds one of the tenant's concurrency slots until dropped.
#[derive(Debug)]
pub struct Slot(Arc<TenantState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TenantState {
    /// Takes one token at `now`, or says how long until one is available.
    pub fn take_token(&self, limit: &RateLimit, now: Instant) -> Result<(), Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second))
        }
    }

    /// Takes a concurrency slot if fewer than `max` are held.
    pub fn enter(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let prev = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(self.clone());
        (prev < max).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let s = TenantState::default();
        let lim = RateLimit {
            per_second: 10.0,
            burst: 5.0,
        };
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(s.take_token(&lim, t0).is_ok());
        }
        let wait = s.take_token(&lim, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 0.25 s later: 2.5 tokens accrued.
        let t1 = t0 + Duration::from_millis(250);
        assert!(s.take_token(&lim, t1).is_ok());
        assert!(s.take_token(&lim, t1).is_ok());
        assert!(s.take_token(&lim, t1).is_err());
        // Never more than the burst, however long idle.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(s.take_token(&lim, t2).is_ok());
        }
        assert!(s.take_token(&lim, t2).is_err());
    }

    #[test]
    fn concurrency_slots_are_released_on_drop() {
        let s = Arc::new(TenantState::default());
        let a = s.enter(2).unwrap();
        let _b = s.enter(2).unwrap();
        assert!(s.enter(2).is_none());
        drop(a);
        assert!(s.enter(2).is_some());
    }
}
