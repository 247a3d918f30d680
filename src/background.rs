//! Background work every replica runs, safe to run on many replicas at once (and in SQLite
//! mode): the task-status poller, the pending sweeper and the retention purge. Each loop
//! stops as soon as the stop channel says so.
//!
//! - The **poller** claims due task-class pushes of the apps it has with a lease (one
//!   replica per push at a time), asks Umeng's `/api/status` about each (a scheduled task
//!   from its `start_time` on), stores the answer unless a newer one is stored, and
//!   schedules the next check with a growing backoff, until a final state, `task_lost`
//!   (Umeng does not know the task), or an hour after the task's expiry.
//! - The **sweeper** marks pushes left `pending` by a crash as `unknown`.
//! - The **purge** deletes pushes older than `history.retention_days` (their idempotency
//!   keys cascade), quota counters of windows older than two days and uploads older than
//!   `history.upload_reuse_days`, in short batches.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;
use crate::store::{PolledApp, PurgeTarget, PushStatus, StoreResult, TaskClaim};
use crate::task_status::{refresh_task, TaskRef};

/// Quota counters are kept this long after their window started (the longest window is a
/// day; the rest is for people looking at yesterday's numbers).
pub const QUOTA_COUNTER_RETENTION: Duration = Duration::from_secs(2 * 86_400);

/// How long after `policy.expire_time` a task is still polled for its final state.
const EXPIRY_GRACE: time::Duration = time::Duration::hours(1);

/// A task without `policy.expire_time` expires this long after its start (Umeng's default,
/// `umeng-api.md` section 3.4).
const UMENG_DEFAULT_EXPIRY: time::Duration = time::Duration::days(3);

/// Start every background loop. They end when `stop` turns true (or its sender is dropped);
/// await the handles to wait for them.
pub fn spawn(gateway: Arc<Gateway>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut handles = vec![
        tokio::spawn(run_sweeper(Arc::clone(&gateway), stop.clone())),
        tokio::spawn(run_purge(Arc::clone(&gateway), stop.clone())),
    ];
    if gateway.config.settings.callbacks.enabled {
        match crate::callbacks::spawn(&gateway.config, Arc::clone(&gateway.store), stop.clone()) {
            Ok(handle) => handles.push(handle),
            Err(e) => tracing::error!(error = %e, "the callback worker cannot start"),
        }
    }
    if gateway.config.settings.delivery.enabled {
        handles.push(crate::delivery::worker::spawn(
            Arc::clone(&gateway),
            stop.clone(),
        ));
    }
    if gateway.config.settings.poller.enabled {
        handles.push(tokio::spawn(run_poller(gateway, stop)));
    }
    handles
}

/// True once stopping was asked for (or nobody can ask any more).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleep for `every`; false when told to stop meanwhile.
async fn pause(stop: &mut watch::Receiver<bool>, every: Duration) -> bool {
    if stopping(stop) {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(every) => true,
        _ = stop.changed() => false,
    }
}

/// Run `work` unless told to stop first; None when stopped (the work is dropped: leases
/// it held run out and other replicas pick its tasks up).
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    if stopping(stop) {
        return None;
    }
    tokio::select! {
        out = work => Some(out),
        _ = stop.changed() => None,
    }
}

/// Marks `pending` pushes whose process died during the Umeng call as `unknown`: once at
/// start, then every `history.sweep_interval_secs`.
async fn run_sweeper(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let h = &gateway.config.settings.history;
    let every = Duration::from_secs(h.sweep_interval_secs.max(1));
    let older_than = i64::try_from(h.pending_timeout_secs).unwrap_or(i64::MAX);
    loop {
        match unless_stopped(&mut stop, gateway.store.sweep_stale_pending(older_than)).await {
            None => return,
            Some(Ok(0)) => {}
            Some(Ok(n)) => tracing::warn!(
                count = n,
                "pending pushes older than {older_than}s marked unknown"
            ),
            Some(Err(e)) => tracing::warn!(error = %e, "pending sweep failed"),
        }
        if !pause(&mut stop, every).await {
            return;
        }
    }
}

/// The task-status poller: a round every `poller.interval_secs`.
async fn run_poller(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(gateway.config.settings.poller.interval_secs.max(1));
    loop {
        match unless_stopped(&mut stop, poll_round(&gateway)).await {
            None => return,
            Some(Ok(0)) => {}
            Some(Ok(n)) => tracing::debug!(tasks = n, "task statuses refreshed"),
            Some(Err(e)) => tracing::warn!(error = %e, "task status poll failed"),
        }
        if !pause(&mut stop, every).await {
            return;
        }
    }
}

/// One poller round: claim the due tasks of the apps configured here (up to
/// `poller.batch_size`), refresh them concurrently, release each with its next check time.
/// Returns how many were claimed.
pub async fn poll_round(gateway: &Gateway) -> StoreResult<usize> {
    let p = &gateway.config.settings.poller;
    let lease = Duration::from_secs(p.lease_secs);
    // Only tasks this replica can sign status calls for: another replica (or a later
    // configuration) may have an app this one lacks, and must still find its tasks due.
    let apps: Vec<PolledApp> = gateway
        .apps
        .iter()
        .map(|(name, runtime)| PolledApp {
            app: name.clone(),
            appkey: runtime.credentials.appkey.clone(),
        })
        .collect();
    if apps.is_empty() {
        return Ok(0);
    }
    let claims = gateway
        .store
        .claim_task_polls(p.batch_size, lease, p.backoff(1), &apps)
        .await?;
    let claimed = claims.len();
    futures::stream::iter(claims)
        .for_each_concurrent(None, |claim| poll_one(gateway, claim, lease))
        .await;
    Ok(claimed)
}

async fn poll_one(gateway: &Gateway, claim: TaskClaim, lease: Duration) {
    let p = &gateway.config.settings.poller;
    // The database's clock when the claim was made (the lease started then).
    let now = claim.lease_until - lease;
    // A scheduled task is first asked about at its start_time.
    if let Some(start) = policy_time(&claim.request, "start_time").filter(|t| *t > now) {
        let wait = Duration::try_from(start - now).unwrap_or(Duration::ZERO);
        release(gateway, &claim, Some(wait)).await;
        return;
    }
    let task = TaskRef {
        push_id: &claim.push_id,
        app: &claim.app,
        appkey: &claim.appkey,
        task_id: &claim.task_id,
        seen_checked_at: claim.task_checked_at,
        claim: Some(claim.polls),
    };
    let next = match refresh_task(gateway, task).await {
        Ok(r) if !r.stored => {
            tracing::debug!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, push.status = %r.status, "a newer task state is stored; this answer was dropped");
            Some(p.backoff(claim.polls.saturating_add(1)))
        }
        Ok(r) if r.status == PushStatus::TaskLost => {
            tracing::warn!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, "Umeng does not know the task; no longer polled");
            None
        }
        Ok(r) if r.status.ends_polling() => {
            tracing::info!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, push.status = %r.status, "task finished");
            None
        }
        Ok(r) => {
            tracing::debug!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, push.status = %r.status, "task not finished yet");
            Some(p.backoff(claim.polls.saturating_add(1)))
        }
        Err(e) => {
            // Including AppGone: the claim only returns apps configured here, so the app
            // went away mid-round; whoever has it polls it later.
            tracing::warn!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, error = %e, "task status refresh failed; trying again later");
            Some(p.backoff(claim.polls.saturating_add(1)))
        }
    };
    let next = match next {
        Some(_) if now >= poll_deadline(&claim, p.max_age_hours) => {
            tracing::warn!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, "task not finished by its deadline; no longer polled (refresh by hand)");
            None
        }
        next => next,
    };
    release(gateway, &claim, next).await;
}

/// End `claim`, scheduling the next poll `next` from now (never again with `None`).
async fn release(gateway: &Gateway, claim: &TaskClaim, next: Option<Duration>) {
    match gateway.store.release_task_poll(claim, next).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(push.id = %claim.push_id, "task poll lease ran out before the refresh ended")
        }
        Err(e) => {
            tracing::warn!(push.id = %claim.push_id, error = %e, "releasing a task poll failed; the lease will run out")
        }
    }
}

/// `policy.<key>` of a stored request (RFC 3339), if present and valid.
fn policy_time(request: &serde_json::Value, key: &str) -> Option<OffsetDateTime> {
    request
        .get("policy")
        .and_then(|p| p.get(key))
        .and_then(|v| v.as_str())
        .and_then(|s| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
}

/// When to stop polling a task that is not final. The task starts at `policy.start_time`
/// (or at creation when sent at once) and ends at `policy.expire_time` (or Umeng's default
/// of three days after its start); polling goes on until an hour after that end, but no
/// longer than `max_age_hours` after the start.
pub fn poll_deadline(claim: &TaskClaim, max_age_hours: u64) -> OffsetDateTime {
    let start = policy_time(&claim.request, "start_time")
        .filter(|t| *t > claim.created_at)
        .unwrap_or(claim.created_at);
    let hours = i64::try_from(max_age_hours).unwrap_or(i64::MAX / 3600);
    let far = OffsetDateTime::now_utc() + time::Duration::days(365);
    let by_age = start
        .checked_add(time::Duration::hours(hours))
        .unwrap_or(far);
    let end = policy_time(&claim.request, "expire_time").unwrap_or(start + UMENG_DEFAULT_EXPIRY);
    let by_expiry = end.checked_add(EXPIRY_GRACE).unwrap_or(far);
    by_age.min(by_expiry)
}

/// The retention purge: once at start, then every `history.purge_interval_secs`.
async fn run_purge(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(gateway.config.settings.history.purge_interval_secs.max(1));
    loop {
        match purge_round(&gateway, &mut stop).await {
            Ok(report) if report.total() > 0 => tracing::info!(
                pushes = report.pushes,
                quota_counters = report.quota_counters,
                uploads = report.uploads,
                "old rows purged"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        if !pause(&mut stop, every).await {
            return;
        }
    }
}

/// Rows deleted by one purge round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub pushes: u64,
    pub quota_counters: u64,
    pub uploads: u64,
}

impl PurgeReport {
    pub fn total(&self) -> u64 {
        self.pushes + self.quota_counters + self.uploads
    }
}

/// One purge round: every target, batch after batch, until a batch comes back short.
/// Stops between batches when told to.
pub async fn purge_round(
    gateway: &Gateway,
    stop: &mut watch::Receiver<bool>,
) -> StoreResult<PurgeReport> {
    let h = &gateway.config.settings.history;
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86_400));
    let mut report = PurgeReport::default();
    let targets = [
        (
            PurgeTarget::Pushes,
            (h.retention_days > 0).then(|| days(h.retention_days)),
        ),
        (PurgeTarget::QuotaCounters, Some(QUOTA_COUNTER_RETENTION)),
        (PurgeTarget::Uploads, Some(days(h.upload_reuse_days))),
    ];
    for (target, older_than) in targets {
        let Some(older_than) = older_than else {
            continue;
        };
        loop {
            if stopping(stop) {
                return Ok(report);
            }
            let n = gateway
                .store
                .purge(target, older_than, h.purge_batch_size)
                .await?;
            match target {
                PurgeTarget::Pushes => report.pushes += n,
                PurgeTarget::QuotaCounters => report.quota_counters += n,
                PurgeTarget::Uploads => report.uploads += n,
            }
            if n < u64::from(h.purge_batch_size) {
                break;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    fn claim(request: serde_json::Value) -> TaskClaim {
        TaskClaim {
            push_id: "p".into(),
            app: "a".into(),
            appkey: "k".into(),
            task_id: "t".into(),
            created_at: datetime!(2026-01-01 00:00 UTC),
            request,
            task_checked_at: None,
            polls: 1,
            lease_until: datetime!(2026-01-01 00:01 UTC),
        }
    }

    #[test]
    fn deadline_is_an_hour_after_expiry_capped_by_max_age_from_the_start() {
        // Sent at once, no expire_time: Umeng's three days, plus an hour.
        assert_eq!(
            poll_deadline(&claim(json!({})), 192),
            datetime!(2026-01-04 01:00 UTC)
        );
        let soon = json!({"policy": {"expire_time": "2026-01-02T08:00:00+08:00"}});
        assert_eq!(
            poll_deadline(&claim(soon), 192),
            datetime!(2026-01-02 01:00 UTC)
        );
        let late = json!({"policy": {"expire_time": "2026-03-01T00:00:00Z"}});
        assert_eq!(
            poll_deadline(&claim(late), 192),
            datetime!(2026-01-09 00:00 UTC),
            "max_age_hours caps it"
        );
        let garbage = json!({"policy": {"expire_time": "tomorrow"}});
        assert_eq!(
            poll_deadline(&claim(garbage), 24),
            datetime!(2026-01-02 00:00 UTC)
        );
    }

    #[test]
    fn a_task_scheduled_days_ahead_is_polled_until_after_it_can_end() {
        // Starts in 7 days and runs for Umeng's default 3: polled until day 10 + 1 h.
        let ahead = json!({"policy": {"start_time": "2026-01-08T00:00:00Z"}});
        assert_eq!(
            poll_deadline(&claim(ahead), 192),
            datetime!(2026-01-11 01:00 UTC)
        );
        // Starts in 7 days and expires 7 days after that.
        let long = json!({"policy": {
            "start_time": "2026-01-08T08:00:00+08:00",
            "expire_time": "2026-01-15T00:00:00Z"
        }});
        assert_eq!(
            poll_deadline(&claim(long), 192),
            datetime!(2026-01-15 01:00 UTC)
        );
    }
}
