//! Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS Architecture
//! Blog): the wait after failed attempt `n` (1-based) is uniformly random in
//! `[0, min(cap, base * 2^(n-1))]`. Used by push delivery and by callbacks.

use std::time::Duration;

use rand::Rng;

/// The upper bound of the wait after failed attempt `n`, in milliseconds.
pub fn ceiling_ms(base_ms: u64, cap_ms: u64, n: u32) -> u64 {
    let doubling = 1u64
        .checked_shl(n.saturating_sub(1).min(63))
        .unwrap_or(u64::MAX);
    base_ms.saturating_mul(doubling).min(cap_ms)
}

/// A random wait after failed attempt `n`: between 0 and [`ceiling_ms`].
pub fn full_jitter(base_ms: u64, cap_ms: u64, n: u32) -> Duration {
    let ceiling = ceiling_ms(base_ms, cap_ms, n);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_waits_stay_under_them() {
        let ceilings: Vec<u64> = (1..=6).map(|n| ceiling_ms(1000, 20_000, n)).collect();
        assert_eq!(ceilings, [1000, 2000, 4000, 8000, 16_000, 20_000]);
        assert_eq!(ceiling_ms(1000, 20_000, u32::MAX), 20_000);
        assert_eq!(ceiling_ms(u64::MAX, u64::MAX, 64), u64::MAX);
        for n in 1..=20 {
            assert!(
                full_jitter(1000, 20_000, n).as_millis() <= u128::from(ceiling_ms(1000, 20_000, n))
            );
        }
    }
}
