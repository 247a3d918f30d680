//! Background work every replica runs, safe to run on many replicas at once (and in SQLite
//! mode): the task-status poller, the pending sweeper and the retention purge. Each loop
//! stops as soon as the stop channel says so.
//!
//! - The **poller** claims due task-class pushes with a lease (one replica per push at a
//!   time), asks Umeng's `/api/status` about each, stores the answer and schedules the next
//!   check with a growing backoff, until a final state, the task's expiry or
//!   `poller.max_age_hours`.
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
use crate::store::{PurgeTarget, StoreResult, TaskClaim};
use crate::task_status::{refresh_task, RefreshError};

/// Quota counters are kept this long after their window started (the longest window is a
/// day; the rest is for people looking at yesterday's numbers).
pub const QUOTA_COUNTER_RETENTION: Duration = Duration::from_secs(2 * 86_400);

/// How long after `policy.expire_time` a task is still polled for its final state.
const EXPIRY_GRACE: time::Duration = time::Duration::hours(1);

/// Start every background loop. They end when `stop` turns true (or its sender is dropped);
/// await the handles to wait for them.
pub fn spawn(gateway: Arc<Gateway>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut handles = vec![
        tokio::spawn(run_sweeper(Arc::clone(&gateway), stop.clone())),
        tokio::spawn(run_purge(Arc::clone(&gateway), stop.clone())),
    ];
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

/// One poller round: claim the due tasks (up to `poller.batch_size`), refresh them
/// concurrently, release each with its next check time. Returns how many were claimed.
pub async fn poll_round(gateway: &Gateway) -> StoreResult<usize> {
    let p = &gateway.config.settings.poller;
    let lease = Duration::from_secs(p.lease_secs);
    let claims = gateway
        .store
        .claim_task_polls(p.batch_size, lease, p.backoff(1))
        .await?;
    let claimed = claims.len();
    futures::stream::iter(claims)
        .for_each_concurrent(None, |claim| poll_one(gateway, claim, lease))
        .await;
    Ok(claimed)
}

async fn poll_one(gateway: &Gateway, claim: TaskClaim, lease: Duration) {
    let p = &gateway.config.settings.poller;
    let next = match refresh_task(gateway, &claim.push_id, &claim.app, &claim.task_id).await {
        Ok(status) if status.is_final_task_state() => {
            tracing::info!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, push.status = %status, "task finished");
            None
        }
        Ok(status) => {
            tracing::debug!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, push.status = %status, "task not finished yet");
            Some(p.backoff(claim.polls.saturating_add(1)))
        }
        Err(e @ RefreshError::AppGone(_)) => {
            tracing::warn!(push.id = %claim.push_id, error = %e, "task no longer polled");
            None
        }
        Err(e) => {
            tracing::warn!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, error = %e, "task status refresh failed; trying again later");
            Some(p.backoff(claim.polls.saturating_add(1)))
        }
    };
    // The database's clock when the claim was made (the lease started then).
    let now = claim.lease_until - lease;
    let next = match next {
        Some(_) if now >= poll_deadline(&claim, p.max_age_hours) => {
            tracing::warn!(push.id = %claim.push_id, umeng.task_id = %claim.task_id, "task not finished by its deadline; no longer polled (refresh by hand)");
            None
        }
        next => next,
    };
    match gateway.store.release_task_poll(&claim, next).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(push.id = %claim.push_id, "task poll lease ran out before the refresh ended")
        }
        Err(e) => {
            tracing::warn!(push.id = %claim.push_id, error = %e, "releasing a task poll failed; the lease will run out")
        }
    }
}

/// When to stop polling a task that is not final: `max_age_hours` after creation, or an
/// hour after the request's `policy.expire_time` when that is earlier.
pub fn poll_deadline(claim: &TaskClaim, max_age_hours: u64) -> OffsetDateTime {
    let hours = i64::try_from(max_age_hours).unwrap_or(i64::MAX / 3600);
    let by_age = claim
        .created_at
        .checked_add(time::Duration::hours(hours))
        .unwrap_or(OffsetDateTime::now_utc() + time::Duration::days(365));
    let by_expiry = claim
        .request
        .pointer("/policy/expire_time")
        .and_then(|v| v.as_str())
        .and_then(|s| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
        .map(|t| t + EXPIRY_GRACE);
    match by_expiry {
        Some(t) if t < by_age => t,
        _ => by_age,
    }
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
            task_id: "t".into(),
            created_at: datetime!(2026-01-01 00:00 UTC),
            request,
            polls: 1,
            lease_until: datetime!(2026-01-01 00:01 UTC),
        }
    }

    #[test]
    fn deadline_is_max_age_or_an_hour_after_expiry_whichever_is_first() {
        assert_eq!(
            poll_deadline(&claim(json!({})), 192),
            datetime!(2026-01-09 00:00 UTC)
        );
        let soon = json!({"policy": {"expire_time": "2026-01-02T08:00:00+08:00"}});
        assert_eq!(
            poll_deadline(&claim(soon), 192),
            datetime!(2026-01-02 01:00 UTC)
        );
        let late = json!({"policy": {"expire_time": "2026-03-01T00:00:00Z"}});
        assert_eq!(
            poll_deadline(&claim(late), 192),
            datetime!(2026-01-09 00:00 UTC)
        );
        let garbage = json!({"policy": {"expire_time": "tomorrow"}});
        assert_eq!(
            poll_deadline(&claim(garbage), 24),
            datetime!(2026-01-02 00:00 UTC)
        );
    }
}
