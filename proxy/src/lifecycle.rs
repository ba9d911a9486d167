//! Readiness and drain state, and the close signal listeners obey.
//!
//! Drain is proactive and gradual (DESIGN.md §6): readiness goes off first so the load balancer
//! stops sending new clients; listeners keep serving for `drain.delay`; then each client
//! connection is asked to go (HTTP/2 GOAWAY, `Connection: close` on HTTP/1.1) at a random moment
//! within `drain.spread`, so clients do not reconnect in one wave; whatever is still open at
//! `drain.timeout` is cut.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

/// What a listener is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    Serving,
    /// Stop accepting; ask each connection to close at a random moment within `spread`;
    /// cut what remains at `deadline`.
    Closing {
        spread: Duration,
        deadline: Instant,
    },
}

pub type CloseSignal = watch::Receiver<ListenerState>;

/// Milliseconds since the process started to keep time: cheap to store in an atomic.
pub fn millis() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// The instant `millis` names.
pub fn instant_of(ms: u64) -> Instant {
    Instant::now() - Duration::from_millis(millis().saturating_sub(ms))
}

/// Waits until the listener is told to close: (spread, deadline). If nobody can tell it any
/// more (the instance is going away), now.
pub async fn closing(rx: &mut CloseSignal) -> (Duration, Instant) {
    match rx.wait_for(|s| matches!(s, ListenerState::Closing { .. })).await {
        Ok(s) => match *s {
            ListenerState::Closing { spread, deadline } => (spread, deadline),
            ListenerState::Serving => unreachable!("waited for Closing"),
        },
        Err(_) => (Duration::ZERO, Instant::now()),
    }
}

/// Waits for the listener's close signal, then a random moment within its spread, so that
/// connections are asked to go one by one rather than in one wave; returns the deadline.
pub async fn closing_spread(rx: &mut CloseSignal) -> Instant {
    let (spread, deadline) = closing(rx).await;
    tokio::time::sleep(spread_wait(spread)).await;
    deadline
}

/// The close signal as it stands: `Some((spread, deadline))` once the listener is closing.
pub fn closing_now(rx: &CloseSignal) -> Option<(Duration, Instant)> {
    match *rx.borrow() {
        ListenerState::Closing { spread, deadline } => Some((spread, deadline)),
        ListenerState::Serving => None,
    }
}

/// How long one connection waits, once its listener is closing, before it is asked to go: a
/// random moment within `spread`.
pub fn spread_wait(spread: Duration) -> Duration {
    use rand::Rng;
    if spread.is_zero() {
        Duration::ZERO
    } else {
        spread.mul_f64(rand::rng().random_range(0.0..1.0))
    }
}

#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
}

impl Lifecycle {
    /// Marks the instance as draining; true only for the call that started it.
    pub fn begin_drain(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Why the instance is not ready, if it is not.
    pub fn not_ready_reason(&self, identity_not_after: SystemTime, now: SystemTime) -> Option<String> {
        if self.is_draining() {
            return Some("draining".into());
        }
        if now >= identity_not_after {
            return Some(format!(
                "workload identity expired at {}",
                crate::identity::rfc3339(identity_not_after)
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_starts_once_and_turns_readiness_off() {
        let l = Lifecycle::default();
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(l.not_ready_reason(later, SystemTime::now()), None);
        assert!(l.begin_drain());
        assert!(!l.begin_drain());
        assert_eq!(
            l.not_ready_reason(later, SystemTime::now()).as_deref(),
            Some("draining")
        );
    }

    #[test]
    fn expired_identity_is_not_ready() {
        let l = Lifecycle::default();
        let past = SystemTime::now() - Duration::from_secs(1);
        assert!(l.not_ready_reason(past, SystemTime::now()).unwrap().contains("expired"));
    }
}
