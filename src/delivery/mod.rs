//! A push's life after admission: what an Umeng outcome means (push state, quota action,
//! metric, whether another attempt is safe), and the Umeng circuit breaker.

pub mod backoff;
pub mod breaker;
pub mod outcome;
pub mod wake;
pub mod worker;

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use outcome::{classify, Verdict};
pub use wake::DeliveryWake;
