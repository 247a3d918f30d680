//! The callback worker: claims due events with a lease, POSTs them signed, records each
//! attempt, and schedules the next one (exponential backoff with full jitter) or ends the
//! event (delivered, or given up).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::{event_data, sign, signing_key, CallbackEventBody};
use crate::config::{CallbackSettings, Config};
use crate::metrics::{callback_delivery, CallbackOutcome};
use crate::store::{CallbackAttempt, CallbackClaim, CallbackNext, Store};

/// At most this much of a receiver's answer is read (then the connection is dropped).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// At most this many characters of a transport error are recorded.
const MAX_ERROR_CHARS: usize = 300;
/// Most events claimed in one statement.
const MAX_CLAIM: u32 = 100;

/// Everything a worker needs: the store, the settings and the clients' signing keys.
pub struct CallbackWorker {
    store: Arc<dyn Store>,
    settings: CallbackSettings,
    keys: HashMap<String, Vec<u8>>,
    http: reqwest::Client,
}

impl CallbackWorker {
    pub fn new(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let settings = config.settings.callbacks.clone();
        let mut keys = HashMap::new();
        for client in &config.clients {
            if let Some(cb) = &client.callbacks {
                let key = signing_key(&cb.secret).map_err(|why| {
                    anyhow::anyhow!("client {}: the callback secret {why}", client.name)
                })?;
                keys.insert(client.name.clone(), key);
            }
        }
        let timeout = Duration::from_millis(settings.timeout_ms);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("umeng-push-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(CallbackWorker {
            store,
            settings,
            keys,
            http,
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.lease_secs)
    }

    /// One attempt of a claimed event, recorded.
    pub async fn deliver(&self, claim: CallbackClaim) {
        let s = &self.settings;
        let now = OffsetDateTime::now_utc();
        let mut log = claim.log.clone();
        // A claim past the last attempt: its worker died (the lease ran out) on the last one.
        if claim.attempt > s.max_attempts {
            self.record(&claim, &log, CallbackNext::GiveUp).await;
            return;
        }
        let attempt = self.attempt(&claim, now).await;
        let ok = attempt.http_status.is_some_and(|s| (200..300).contains(&s));
        log.push(attempt);
        let keep = usize::try_from(s.max_attempts).unwrap_or(usize::MAX);
        if log.len() > keep {
            log.drain(..log.len() - keep);
        }
        let next = if ok {
            CallbackNext::Delivered
        } else if claim.attempt >= s.max_attempts {
            CallbackNext::GiveUp
        } else {
            let wait = backoff(s, claim.attempt);
            let deadline = claim.created_at
                + time::Duration::hours(i64::try_from(s.max_age_hours).unwrap_or(24));
            if now + wait > deadline {
                CallbackNext::GiveUp
            } else {
                CallbackNext::RetryIn(wait)
            }
        };
        match next {
            CallbackNext::Delivered => {
                tracing::debug!(callback.id = %claim.id, push.id = %claim.push_id, attempt = claim.attempt, "callback delivered");
            }
            CallbackNext::RetryIn(wait) => {
                callback_delivery(CallbackOutcome::FailedAttempt);
                tracing::info!(callback.id = %claim.id, push.id = %claim.push_id, attempt = claim.attempt, retry_in_ms = wait.as_millis() as u64, "callback attempt failed");
            }
            CallbackNext::GiveUp => {
                tracing::warn!(callback.id = %claim.id, push.id = %claim.push_id, attempt = claim.attempt, "callback given up");
            }
        }
        self.record(&claim, &log, next).await;
    }

    async fn record(&self, claim: &CallbackClaim, log: &[CallbackAttempt], next: CallbackNext) {
        match next {
            CallbackNext::Delivered => callback_delivery(CallbackOutcome::Delivered),
            CallbackNext::GiveUp => callback_delivery(CallbackOutcome::GaveUp),
            CallbackNext::RetryIn(_) => {}
        }
        match self.store.record_callback(claim, log, next).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(callback.id = %claim.id, "callback claim taken over by another worker; this attempt's record was dropped")
            }
            // The lease runs out and the event is tried again: at least once.
            Err(e) => {
                tracing::warn!(callback.id = %claim.id, error = %e, "recording a callback attempt failed")
            }
        }
    }

    /// POST the event once.
    async fn attempt(&self, claim: &CallbackClaim, now: OffsetDateTime) -> CallbackAttempt {
        let started = Instant::now();
        let mut attempt = CallbackAttempt {
            number: claim.attempt,
            at: now,
            http_status: None,
            error: None,
            latency_ms: 0,
        };
        let Some(key) = self.keys.get(&claim.client) else {
            attempt.error = Some(format!(
                "no callback secret for client {:?} is configured on this replica",
                claim.client
            ));
            return attempt;
        };
        let body = CallbackEventBody {
            event_type: claim.event_type.clone(),
            timestamp: claim.created_at,
            data: event_data(&claim.data),
        }
        .to_bytes();
        let timestamp = now.unix_timestamp();
        let signature = sign(key, &claim.id, timestamp, &body);
        let sent = self
            .http
            .post(&claim.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &claim.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(mut response) => {
                attempt.http_status = Some(response.status().as_u16());
                // Read (and drop) a bounded part of the answer.
                let mut read = 0usize;
                while read < MAX_RESPONSE_BYTES {
                    match response.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
            }
            Err(e) => attempt.error = Some(describe(&e)),
        }
        attempt.latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        attempt
    }
}

/// A transport error in a few words (bounded).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {e}");
    if let Some(source) = std::error::Error::source(e) {
        text.push_str(&format!(" ({source})"));
    }
    text.chars().take(MAX_ERROR_CHARS).collect()
}

/// The wait after failed attempt `n` (1-based): uniformly random in
/// `[0, min(cap, base * 2^(n-1))]` (full jitter).
pub fn backoff(s: &CallbackSettings, n: u32) -> Duration {
    crate::delivery::backoff::full_jitter(s.backoff_base_ms, s.backoff_cap_ms, n)
}

/// The upper bound of the wait after failed attempt `n`, in milliseconds.
pub fn backoff_ceiling(s: &CallbackSettings, n: u32) -> u64 {
    crate::delivery::backoff::ceiling_ms(s.backoff_base_ms, s.backoff_cap_ms, n)
}

/// Start the worker loop (every replica runs one). It ends when `stop` turns true; the
/// deliveries in flight then finish (each is bounded by `callbacks.timeout_ms`).
pub fn spawn(
    config: &Config,
    store: Arc<dyn Store>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let worker = Arc::new(CallbackWorker::new(config, store)?);
    crate::metrics::register_callback_outcomes();
    Ok(tokio::spawn(async move {
        let s = worker.settings.clone();
        let every = Duration::from_millis(s.interval_ms);
        let slots = Arc::new(Semaphore::new(
            usize::try_from(s.concurrency).unwrap_or(1).max(1),
        ));
        let mut in_flight = JoinSet::new();
        loop {
            if *stop.borrow() || stop.has_changed().is_err() {
                break;
            }
            while in_flight.try_join_next().is_some() {}
            let free = u32::try_from(slots.available_permits()).unwrap_or(u32::MAX);
            if free == 0 {
                // Wait for a slot (or the stop).
                tokio::select! {
                    _ = in_flight.join_next() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let claimed = tokio::select! {
                c = worker.store.claim_callbacks(free.min(MAX_CLAIM), worker.lease()) => c,
                _ = stop.changed() => break,
            };
            match claimed {
                Ok(claims) if !claims.is_empty() => {
                    for claim in claims {
                        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                            break;
                        };
                        let w = Arc::clone(&worker);
                        in_flight.spawn(async move {
                            w.deliver(claim).await;
                            drop(permit);
                        });
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "claiming callback events failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = CallbackSettings::default();
        let ceilings: Vec<u64> = (1..=12).map(|n| backoff_ceiling(&s, n)).collect();
        assert_eq!(
            ceilings,
            [
                5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000,
                2_560_000, 3_600_000, 3_600_000
            ]
        );
        assert_eq!(backoff_ceiling(&s, u32::MAX), 3_600_000);
        for n in 1..=20 {
            assert!(backoff(&s, n).as_millis() <= u128::from(backoff_ceiling(&s, n)));
        }
    }
}
