//! The delivery worker (every replica runs one, and the single SQLite instance): claims due
//! asynchronous pushes with a lease, sends each, and records the outcome or the next try
//! ([`Gateway::deliver_claimed`]). Concurrency is bounded globally
//! (`delivery.concurrency`) and per app (`delivery.per_app_concurrency`). While the Umeng
//! circuit breaker is open nothing is claimed; when it lets a probe through, one push is
//! claimed and sent as the probe. Every few seconds it also recovers pushes whose worker's
//! lease ran out (see [`crate::store::Store::recover_deliveries`]), settles parent pushes
//! whose parts all ended, and refreshes the queue gauges.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::delivery::wake::Woken;
use crate::gateway::Gateway;
use crate::metrics;
use crate::store::{DeliveryApp, DeliveryClaim, PushStatus};

/// Most pushes claimed in one statement.
const MAX_CLAIM: usize = 64;
/// How often lapsed leases are recovered and the queue gauges refreshed.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How often a claim reads an app's whole queue; the claims in between start where the
/// last push claimed was due ([`Floors`]).
const WHOLE_QUEUE_EVERY: Duration = Duration::from_secs(5);
/// How far before the last claimed push's due time the next claim starts: a push admitted
/// just before it, in a transaction that committed after the claim, is still found.
const FLOOR_MARGIN: time::Duration = time::Duration::milliseconds(250);

/// Start the worker loop. It ends when `stop` turns true; deliveries in flight are tracked
/// by the gateway and finish during its drain.
pub fn spawn(gateway: Arc<Gateway>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(run(gateway, stop))
}

struct Slots {
    global: Arc<Semaphore>,
    per_app: HashMap<String, Arc<Semaphore>>,
    /// Signalled whenever a delivery ends and gives its slots back.
    freed: Arc<Notify>,
}

impl Slots {
    fn new(gateway: &Gateway) -> Self {
        let s = &gateway.config.settings.delivery;
        let per_app = usize::try_from(s.per_app_concurrency).unwrap_or(1).max(1);
        Slots {
            global: Arc::new(Semaphore::new(
                usize::try_from(s.concurrency).unwrap_or(1).max(1),
            )),
            per_app: gateway
                .apps
                .keys()
                .map(|name| (name.clone(), Arc::new(Semaphore::new(per_app))))
                .collect(),
            freed: Arc::new(Notify::new()),
        }
    }

    /// Whether `app` has a free slot.
    fn has_free(&self, app: &str) -> bool {
        self.per_app
            .get(app)
            .is_some_and(|s| s.available_permits() > 0)
    }

    /// The apps that have a free slot, with how many and where to read their queue from,
    /// leaving out the quiet ones.
    fn apps(
        &self,
        gateway: &Gateway,
        quiet: &Quiet,
        floors: &Floors,
        now: Instant,
    ) -> Vec<DeliveryApp> {
        let mut apps: Vec<DeliveryApp> = gateway
            .apps
            .values()
            .filter(|a| !quiet.contains(&a.app.name))
            .filter_map(|a| {
                let free = self.per_app.get(&a.app.name)?.available_permits();
                (free > 0).then(|| DeliveryApp {
                    app: a.app.name.clone(),
                    appkey: a.app.appkey.clone(),
                    limit: u32::try_from(free).unwrap_or(u32::MAX),
                    due_from: floors.due_from(&a.app.name, now),
                })
            })
            .collect();
        apps.sort_by(|a, b| a.app.cmp(&b.app));
        apps
    }

    /// A global and an app slot for a claimed push (both free: the claim was sized by
    /// them, and only this loop takes slots).
    fn take(&self, app: &str) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let global = Arc::clone(&self.global).try_acquire_owned().ok()?;
        let app = Arc::clone(self.per_app.get(app)?)
            .try_acquire_owned()
            .ok()?;
        Some((global, app))
    }
}

/// Apps whose last claim found nothing more due, each with when to look again. A quiet
/// app is left out of claims until then, or until a push of it is admitted here: with one
/// app at its concurrency limit and another idle, each delivery of the busy app that ended
/// used to be followed by a claim for the idle one that found nothing.
#[derive(Debug, Default)]
struct Quiet(HashMap<String, Instant>);

impl Quiet {
    fn insert(&mut self, app: &str, until: Instant) {
        self.0.insert(app.to_owned(), until);
    }

    fn contains(&self, app: &str) -> bool {
        self.0.contains_key(app)
    }

    /// Forget the apps with new pushes, and those whose time to look again has come.
    fn wake(&mut self, woken: &Woken, now: Instant) {
        if woken.any {
            self.0.clear();
        } else {
            self.0
                .retain(|app, until| *until > now && !woken.apps.contains(app));
        }
    }

    /// The earliest time to look at a quiet app again, or `otherwise`.
    fn next_look(&self, otherwise: Instant) -> Instant {
        self.0
            .values()
            .copied()
            .min()
            .unwrap_or(otherwise)
            .min(otherwise)
    }
}

/// Where each app's next claim starts reading its queue ([`DeliveryApp::due_from`]): the
/// due time of the last push claimed for it, less [`FLOOR_MARGIN`]; from the start when a
/// claim last read the whole queue [`WHOLE_QUEUE_EVERY`] ago or more. The claims take the
/// oldest due first, so the pushes due earlier were claimed, or are being claimed by
/// another replica. One due earlier that a claim did not see (committed late, or held by
/// another transaction at the time) is found by the next whole read.
#[derive(Debug, Default)]
struct Floors(HashMap<String, Floor>);

#[derive(Debug)]
struct Floor {
    from: Option<OffsetDateTime>,
    /// When a claim last read the app's whole queue.
    whole_at: Instant,
}

impl Floors {
    fn due_from(&self, app: &str, now: Instant) -> Option<OffsetDateTime> {
        let floor = self.0.get(app)?;
        if now.saturating_duration_since(floor.whole_at) >= WHOLE_QUEUE_EVERY {
            return None;
        }
        floor.from
    }

    /// After a claim for `apps` that returned `claims`. A floor never moves back: a push
    /// found behind it by a whole read does not make the next claims read the dead entries
    /// again.
    fn claimed(&mut self, apps: &[DeliveryApp], claims: &[DeliveryClaim], now: Instant) {
        for app in apps {
            let floor = self.0.entry(app.app.clone()).or_insert(Floor {
                from: None,
                whole_at: now,
            });
            if app.due_from.is_none() {
                floor.whole_at = now;
            }
            let last = claims
                .iter()
                .filter(|c| c.app == app.app)
                .map(|c| c.due_at)
                .max();
            floor.from = floor.from.max(last.map(|t| t - FLOOR_MARGIN));
        }
    }
}

async fn run(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let settings = gateway.config.settings.delivery.clone();
    let idle = Duration::from_millis(settings.interval_ms);
    let lease = Duration::from_secs(settings.lease_secs);
    let slots = Slots::new(&gateway);
    let mut quiet = Quiet::default();
    let mut floors = Floors::default();
    let mut upkeep_at = Instant::now();
    let mut release_at = Instant::now();
    loop {
        if *stop.borrow() || stop.has_changed().is_err() {
            return;
        }
        if Instant::now() >= upkeep_at {
            upkeep(&gateway).await;
            upkeep_at = Instant::now() + UPKEEP_EVERY;
        }
        // Parents held or waiting for quota as a whole: their parts join the queue when due.
        if Instant::now() >= release_at {
            gateway.release_parents().await;
            release_at = Instant::now() + idle;
        }
        // While Umeng is unreachable nothing is claimed: the pushes wait where they are.
        let permit = match gateway.breaker.try_call() {
            Ok(permit) => permit,
            Err(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(idle)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        quiet.wake(&gateway.delivery_wake.take(), Instant::now());
        let free = slots.global.available_permits();
        let apps = slots.apps(&gateway, &quiet, &floors, Instant::now());
        if free == 0 || apps.is_empty() {
            gateway.breaker.release(permit);
            // Every slot is busy, or each app with a free slot has nothing due: wait for a
            // delivery to end, for a new push of an app with a free slot, or for a quiet
            // app's next look (retries and held pushes fall due by the clock; other
            // replicas' pushes are not announced here).
            let until = tokio::time::Instant::from_std(quiet.next_look(Instant::now() + idle));
            loop {
                tokio::select! {
                    _ = gateway.delivery_wake.notified() => {
                        let woken = gateway.delivery_wake.take();
                        quiet.wake(&woken, Instant::now());
                        if woken.concerns(|app| slots.has_free(app)) {
                            break;
                        }
                    }
                    _ = slots.freed.notified() => break,
                    _ = tokio::time::sleep_until(until) => break,
                    _ = stop.changed() => break,
                }
            }
            continue;
        }
        let probe = permit.is_probe();
        let limit = if probe { 1 } else { free.min(MAX_CLAIM) };
        let claimed = tokio::select! {
            c = gateway.store.claim_deliveries(u32::try_from(limit).unwrap_or(1), lease, &apps) => c,
            _ = stop.changed() => {
                gateway.breaker.release(permit);
                return;
            }
        };
        metrics::delivery_claim(match &claimed {
            Ok(claims) if claims.is_empty() => metrics::ClaimResult::Empty,
            Ok(_) => metrics::ClaimResult::Took,
            Err(_) => metrics::ClaimResult::Failed,
        });
        let claims = match claimed {
            Ok(claims) => claims,
            Err(e) => {
                gateway.breaker.release(permit);
                tracing::warn!(error = %e, "claiming due pushes failed");
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        floors.claimed(&apps, &claims, Instant::now());
        // A claim that was not cut short by its overall limit took everything due of each
        // app that got fewer pushes than it had slots for (from its floor on).
        if claims.len() < limit {
            let until = Instant::now() + idle;
            for app in &apps {
                let got = claims.iter().filter(|c| c.app == app.app).count();
                if got < usize::try_from(app.limit).unwrap_or(usize::MAX) {
                    quiet.insert(&app.app, until);
                }
            }
        }
        if claims.is_empty() {
            gateway.breaker.release(permit);
            continue;
        }
        // The probe permit goes with the first push; the others ask the breaker themselves.
        let mut probe_permit = if probe {
            Some(permit)
        } else {
            gateway.breaker.release(permit);
            None
        };
        for claim in claims {
            let held = slots.take(&claim.app);
            let g = Arc::clone(&gateway);
            let permit = probe_permit.take();
            let freed = Arc::clone(&slots.freed);
            let span =
                tracing::info_span!("delivery", push.id = %claim.push_id, attempt = claim.claim);
            gateway.spawn_tracked(
                async move {
                    g.deliver_claimed(claim, permit).await;
                    drop(held);
                    freed.notify_one();
                }
                .instrument(span),
            );
        }
    }
}

/// Recover lapsed leases and refresh the queue gauges.
async fn upkeep(gateway: &Gateway) {
    match gateway.store.recover_deliveries().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            count = n,
            "pushes whose delivery worker's lease ran out mid-send recovered: task-class ones are due again, the rest are unknown"
        ),
        Err(e) => tracing::warn!(error = %e, "recovering lapsed deliveries failed"),
    }
    // Parents whose last part ended without its worker settling them.
    gateway.settle_parents().await;
    let stats = match gateway.store.queue_stats().await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::debug!(error = %e, "reading the queue depth failed");
            return;
        }
    };
    let now = OffsetDateTime::now_utc();
    let states = [
        PushStatus::AwaitingSend,
        PushStatus::AwaitingSendAt,
        PushStatus::AwaitingQuota,
        PushStatus::Pending,
    ];
    for app in gateway.apps.keys() {
        let depth: Vec<(&'static str, u64)> = states
            .iter()
            .map(|state| {
                let n = stats
                    .iter()
                    .filter(|s| &s.app == app && s.status == *state)
                    .map(|s| s.count)
                    .sum();
                (state.as_str(), n)
            })
            .collect();
        let oldest = stats
            .iter()
            .filter(|s| &s.app == app)
            .filter_map(|s| s.oldest_due)
            .min()
            .map_or(0.0, |due| (now - due).as_seconds_f64().max(0.0));
        metrics::queue(app, &depth, oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(any: bool, apps: &[&str]) -> Woken {
        Woken {
            any,
            apps: apps.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn app(name: &str, due_from: Option<OffsetDateTime>) -> DeliveryApp {
        DeliveryApp {
            app: name.into(),
            appkey: format!("{name}-key"),
            limit: 4,
            due_from,
        }
    }

    fn claimed(app: &str, due_at: OffsetDateTime) -> DeliveryClaim {
        DeliveryClaim {
            push_id: "p".into(),
            app: app.into(),
            appkey: format!("{app}-key"),
            cast_type: "unicast".into(),
            task_class: false,
            production_mode: true,
            out_biz_no: None,
            outbox: serde_json::Value::Null,
            attempts: Vec::new(),
            claim: 1,
            lease_until: due_at,
            created_at: due_at,
            deliver_by: None,
            quota_kind: None,
            quota_wait: false,
            parent_id: None,
            due_at,
        }
    }

    #[test]
    fn a_claim_starts_where_the_last_claimed_push_was_due_between_whole_reads() {
        let now = Instant::now();
        let t = OffsetDateTime::now_utc();
        let mut floors = Floors::default();
        assert_eq!(
            floors.due_from("shop", now),
            None,
            "the first claim reads it all"
        );

        // A whole read that claimed two of shop's pushes and none of other's.
        let apps = [app("shop", None), app("other", None)];
        let claims = [
            claimed("shop", t),
            claimed("shop", t + time::Duration::seconds(1)),
        ];
        floors.claimed(&apps, &claims, now);
        let shop = t + time::Duration::seconds(1) - FLOOR_MARGIN;
        assert_eq!(floors.due_from("shop", now), Some(shop));
        assert_eq!(
            floors.due_from("other", now),
            None,
            "nothing claimed: no floor"
        );

        // A push found behind the floor does not move it back.
        floors.claimed(&[app("shop", Some(shop))], &[claimed("shop", t)], now);
        assert_eq!(floors.due_from("shop", now), Some(shop));

        // Floored claims do not count as whole reads: the whole queue is read again in time.
        let later = now + WHOLE_QUEUE_EVERY;
        floors.claimed(
            &[app("shop", Some(shop))],
            &[],
            now + Duration::from_secs(1),
        );
        assert_eq!(floors.due_from("shop", later), None);
        floors.claimed(&[app("shop", None)], &[], later);
        assert_eq!(floors.due_from("shop", later), Some(shop));
    }

    #[test]
    fn a_quiet_app_wakes_for_its_own_push_its_time_or_any_push() {
        let now = Instant::now();
        let mut quiet = Quiet::default();
        quiet.insert("idle", now + Duration::from_millis(500));
        quiet.insert("other", now + Duration::from_millis(200));
        assert_eq!(
            quiet.next_look(now + Duration::from_secs(1)),
            now + Duration::from_millis(200)
        );

        // A push of another app leaves both quiet; one of "idle" wakes it alone.
        quiet.wake(&woken(false, &["busy"]), now);
        assert!(quiet.contains("idle") && quiet.contains("other"));
        quiet.wake(&woken(false, &["idle"]), now);
        assert!(!quiet.contains("idle") && quiet.contains("other"));

        // Its time to look again.
        quiet.wake(&Woken::default(), now + Duration::from_millis(200));
        assert!(!quiet.contains("other"));
        assert_eq!(
            quiet.next_look(now),
            now,
            "nothing quiet: the caller's time"
        );

        quiet.insert("idle", now + Duration::from_secs(5));
        quiet.insert("other", now + Duration::from_secs(5));
        quiet.wake(&woken(true, &[]), now);
        assert!(!quiet.contains("idle") && !quiet.contains("other"));
    }
}
