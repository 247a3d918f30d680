//! The Umeng circuit breaker: after `failures` transport failures in a row (nothing sent,
//! timeouts, answers that were not Umeng's), stop calling Umeng for `cooldown`, then let one
//! probe through at a time until a call gets an answer from Umeng.
//!
//! It is per process on purpose: each replica judges its own path to Umeng, and a breaker
//! only saves calls that would fail anyway, so replicas need not agree. Umeng's FAIL answers
//! (even its internal errors) prove Umeng is reachable and close the breaker.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Transport failures in a row that open the breaker (0 turns the breaker off).
    pub failures: u32,
    /// How long an open breaker refuses calls before it lets a probe through.
    pub cooldown: Duration,
}

/// The state, as the `umeng_breaker_state` gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Refusing calls until the cool-down ends.
    Open,
    /// Cool-down over: one probe at a time goes through.
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// Transport failures in a row.
    failures: u32,
    /// While open: when the cool-down ends.
    open_until: Option<Instant>,
    /// A probe is in flight (half-open).
    probing: bool,
}

/// A permission to call Umeng; report how the call went with [`Breaker::record`].
#[derive(Debug)]
#[must_use = "report the call's result with Breaker::record"]
pub struct Permit {
    probe: bool,
}

impl Permit {
    /// The one call let through while half-open, to see whether Umeng answers again.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// Thread-safe; cheap to consult on every call.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        metrics::umeng_breaker(BreakerState::Closed.gauge());
        Breaker {
            config,
            inner: Mutex::new(Inner {
                failures: 0,
                open_until: None,
                probing: false,
            }),
        }
    }

    /// May a call go to Umeng now? `Err(wait)` while open (or while a probe is out), with
    /// how long until a call may be tried again.
    pub fn try_call(&self) -> Result<Permit, Duration> {
        self.try_call_at(Instant::now())
    }

    fn try_call_at(&self, now: Instant) -> Result<Permit, Duration> {
        if self.config.failures == 0 {
            return Ok(Permit { probe: false });
        }
        let mut inner = self.lock();
        match inner.open_until {
            None => Ok(Permit { probe: false }),
            Some(until) if now < until => Err(until - now),
            Some(_) if inner.probing => Err(Duration::from_secs(1)),
            Some(_) => {
                inner.probing = true;
                metrics::umeng_breaker(BreakerState::HalfOpen.gauge());
                Ok(Permit { probe: true })
            }
        }
    }

    /// Report a call: `reached` is false for a transport failure (nothing sent, timeout, an
    /// answer that was not Umeng's), true when Umeng answered (SUCCESS or FAIL).
    pub fn record(&self, permit: Permit, reached: bool) {
        self.record_at(permit, reached, Instant::now());
    }

    fn record_at(&self, permit: Permit, reached: bool, now: Instant) {
        if self.config.failures == 0 {
            return;
        }
        let mut inner = self.lock();
        if permit.probe {
            inner.probing = false;
        }
        if reached {
            if inner.open_until.is_some() {
                tracing::info!("umeng answers again: circuit breaker closed");
            }
            inner.failures = 0;
            inner.open_until = None;
            metrics::umeng_breaker(BreakerState::Closed.gauge());
            return;
        }
        inner.failures = inner.failures.saturating_add(1);
        // A failed probe reopens at once; otherwise the threshold opens it. Calls that
        // were already out when it opened do not extend the cool-down.
        let opens =
            permit.probe || (inner.open_until.is_none() && inner.failures >= self.config.failures);
        if opens {
            inner.open_until = Some(now + self.config.cooldown);
            tracing::warn!(
                failures = inner.failures,
                cooldown_secs = self.config.cooldown.as_secs(),
                "umeng unreachable: circuit breaker open"
            );
            metrics::umeng_breaker(BreakerState::Open.gauge());
        }
    }

    /// Give a permit back unused (the push was answered without calling Umeng).
    pub fn release(&self, permit: Permit) {
        if permit.probe {
            self.lock().probing = false;
        }
    }

    /// The state now (for metrics and the console).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every write is one field.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failures,
            cooldown: Duration::from_secs(30),
        })
    }

    fn fail(b: &Breaker, now: Instant) {
        let permit = b.try_call_at(now).expect("allowed");
        b.record_at(permit, false, now);
    }

    #[test]
    fn opens_after_the_threshold_and_refuses_until_the_cooldown_ends() {
        let b = breaker(3);
        let t0 = Instant::now();
        fail(&b, t0);
        fail(&b, t0);
        assert!(b.try_call_at(t0).is_ok(), "two failures: still closed");
        fail(&b, t0);

        let refused = b.try_call_at(t0 + Duration::from_secs(10));

        assert_eq!(refused.err(), Some(Duration::from_secs(20)));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn an_answer_from_umeng_resets_the_count() {
        let b = breaker(2);
        let t0 = Instant::now();
        fail(&b, t0);
        let ok = b.try_call_at(t0).expect("allowed");
        b.record_at(ok, true, t0);
        fail(&b, t0);
        assert!(b.try_call_at(t0).is_ok());
    }

    #[test]
    fn after_the_cooldown_one_probe_at_a_time_decides() {
        let b = breaker(1);
        let t0 = Instant::now();
        fail(&b, t0);
        let later = t0 + Duration::from_secs(31);

        let probe = b.try_call_at(later).expect("a probe goes through");
        assert!(b.try_call_at(later).is_err(), "only one probe at a time");
        b.record_at(probe, false, later);
        assert_eq!(
            b.try_call_at(later + Duration::from_secs(1)).err(),
            Some(Duration::from_secs(29)),
            "a failed probe reopens for a full cool-down"
        );

        let much_later = later + Duration::from_secs(31);
        let probe = b.try_call_at(much_later).expect("next probe");
        b.record_at(probe, true, much_later);
        assert!(b.try_call_at(much_later).is_ok());
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let b = breaker(0);
        let t0 = Instant::now();
        for _ in 0..10 {
            fail(&b, t0);
        }
        assert!(b.try_call_at(t0).is_ok());
    }
}
