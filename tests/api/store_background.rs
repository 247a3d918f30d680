//! The store contract of the background work (task-poll claims and the retention purge);
//! every case runs against SQLite and PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use umeng_push_gateway::quota::{QuotaKind, QuotaLimit, WindowUnit};
use umeng_push_gateway::store::{
    Admission, Finish, NewPush, PolledApp, PurgeTarget, PushRecord, PushStatus, QuotaAction,
    QuotaClaim, Store, TaskClaim, TaskUpdate,
};

use crate::helpers::{StoreCtx, TestDb};

crate::store_cases!(
    concurrent_claims_never_share_a_task,
    only_unfinished_accepted_tasks_are_claimed,
    an_expired_lease_makes_a_task_claimable_again,
    release_schedules_the_next_poll_or_stops_polling,
    a_final_status_is_not_overwritten_by_a_stale_one,
    tasks_of_apps_not_configured_here_are_left_due,
    task_states_only_move_forward,
    a_poll_answer_after_the_lease_was_taken_over_is_dropped,
    a_refresh_of_a_cancelled_task_keeps_who_cancelled_it,
    task_lost_ends_polling_until_a_real_state_replaces_it,
    purge_deletes_old_rows_in_batches_and_keeps_young_ones,
);

const APPKEY: &str = "appkey-bg";

/// The apps a poller of these tests has: the one every push here is sent with.
fn shop() -> Vec<PolledApp> {
    vec![PolledApp {
        app: "shop".into(),
        appkey: APPKEY.into(),
    }]
}
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn push(cast_type: &str, task_class: bool, out_biz_no: Option<&str>) -> NewPush {
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: APPKEY.into(),
        platform: "android".into(),
        cast_type: cast_type.into(),
        task_class,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: out_biz_no.map(str::to_owned),
        fingerprint: "fp".into(),
        request: json!({"type": cast_type}),
        description: None,
        send_at: None,
        delivery: None,
    }
}

fn accepted(task_id: Option<&str>) -> Finish {
    Finish {
        status: PushStatus::Accepted,
        umeng_request: None,
        umeng_response: Some(json!({"ret": "SUCCESS"})),
        msg_id: None,
        task_id: task_id.map(str::to_owned),
        file_id: None,
        error_code: None,
        error_msg: None,
        http_status: 201,
        latency_ms: Some(5),
        sent_at: None,
        quota: QuotaAction::Keep,
        attempts: Vec::new(),
        claim: None,
    }
}

async fn admitted(store: &Arc<dyn Store>, p: NewPush, quota: Option<QuotaClaim>) -> String {
    match store.admit(p, quota).await {
        Ok(Admission::Admitted { push_id, .. }) => push_id,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

/// An accepted broadcast with a task_id, as the gateway leaves it after Umeng said SUCCESS.
async fn accepted_task(store: &Arc<dyn Store>) -> String {
    let id = admitted(store, push("broadcast", true, None), None).await;
    let task_id = format!("task-{id}");
    match store.finish(&id, accepted(Some(&task_id)).into()).await {
        Ok(true) => id,
        other => panic!("finish failed: {other:?}"),
    }
}

async fn claim(store: &Arc<dyn Store>, limit: u32, lease: Duration) -> Vec<TaskClaim> {
    match store
        .claim_task_polls(limit, lease, Duration::ZERO, &shop())
        .await
    {
        Ok(c) => c,
        Err(e) => panic!("claim_task_polls failed: {e}"),
    }
}

fn ids(claims: &[TaskClaim]) -> HashSet<String> {
    claims.iter().map(|c| c.push_id.clone()).collect()
}

async fn release(store: &Arc<dyn Store>, c: &TaskClaim, next: Option<Duration>) -> bool {
    match store.release_task_poll(c, next).await {
        Ok(b) => b,
        Err(e) => panic!("release_task_poll failed: {e}"),
    }
}

async fn record(store: &Arc<dyn Store>, id: &str) -> PushRecord {
    match store.get_push(id).await {
        Ok(Some(r)) => r,
        other => panic!("get_push {id}: {other:?}"),
    }
}

async fn status(store: &Arc<dyn Store>, id: &str) -> PushStatus {
    record(store, id).await.status
}

/// A task-state write outside the poller (a refresh or a cancel) by a writer that read
/// `task_checked_at` as `seen`. Returns whether it applied.
async fn write(
    store: &Arc<dyn Store>,
    id: &str,
    status: PushStatus,
    task_status: serde_json::Value,
    seen: Option<time::OffsetDateTime>,
) -> bool {
    let update = TaskUpdate {
        status,
        task_status,
        seen_checked_at: seen,
        claim: None,
    };
    match store.update_task(id, update).await {
        Ok(applied) => applied,
        Err(e) => panic!("update_task {id} failed: {e}"),
    }
}

async fn purge(store: &Arc<dyn Store>, target: PurgeTarget, older: Duration, n: u32) -> u64 {
    match store.purge(target, older, n).await {
        Ok(n) => n,
        Err(e) => panic!("purge {target:?} failed: {e}"),
    }
}

async fn concurrent_claims_never_share_a_task(ctx: StoreCtx) {
    let mut all = HashSet::new();
    for _ in 0..24 {
        all.insert(accepted_task(&ctx.store).await);
    }
    // Two replicas: independent pools on one database, claiming at the same time.
    let replicas = [ctx.store.clone(), ctx.db.connect_again().await];
    let mut workers = Vec::new();
    for store in replicas {
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = claim(&store, 3, HOUR).await;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| c.push_id));
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut per_replica = Vec::new();
    for w in workers {
        let mine = w.await.expect("claimer");
        per_replica.push(mine.len());
        for id in mine {
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(
        seen, all,
        "every due task claimed exactly once: {per_replica:?}"
    );
    assert!(claim(&ctx.store, 10, HOUR).await.is_empty(), "all leased");
    assert_eq!(ctx.db.idle_in_transaction().await, 0);
}

async fn only_unfinished_accepted_tasks_are_claimed(ctx: StoreCtx) {
    let store = &ctx.store;
    let due = accepted_task(store).await;
    // Still pending (the Umeng call is in flight): not a task yet.
    admitted(store, push("broadcast", true, None), None).await;
    // Accepted unicast-class push: no task to poll.
    let uni = admitted(store, push("unicast", false, None), None).await;
    assert!(matches!(
        store.finish(&uni, accepted(None).into()).await,
        Ok(true)
    ));
    // Failed task-class push.
    let failed = admitted(store, push("broadcast", true, None), None).await;
    let fail = Finish {
        status: PushStatus::Failed,
        http_status: 502,
        ..accepted(None)
    };
    assert!(matches!(store.finish(&failed, fail.into()).await, Ok(true)));
    // Final task states are never claimed.
    for final_status in [PushStatus::Done, PushStatus::Cancelled, PushStatus::Expired] {
        let id = accepted_task(store).await;
        assert!(write(store, &id, final_status, json!({}), None).await);
    }
    // Unfinished task states are.
    let queued = accepted_task(store).await;
    assert!(
        write(
            store,
            &queued,
            PushStatus::Queued,
            json!({"status": 0}),
            None
        )
        .await
    );

    // Not before the first-poll delay after acceptance.
    let early = store.claim_task_polls(10, HOUR, HOUR, &shop()).await;
    assert!(matches!(&early, Ok(v) if v.is_empty()), "{early:?}");

    let got = claim(store, 10, HOUR).await;
    assert_eq!(ids(&got), HashSet::from([due.clone(), queued]));
    let first = got.iter().find(|c| c.push_id == due).expect("due claimed");
    assert_eq!(first.task_id, format!("task-{due}"));
    assert_eq!(first.app, "shop");
    assert_eq!(first.polls, 1);
    assert_eq!(first.request, json!({"type": "broadcast"}));
}

async fn an_expired_lease_makes_a_task_claimable_again(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let lease = Duration::from_millis(300);
    let first = claim(store, 10, lease).await;
    assert_eq!(ids(&first), HashSet::from([id.clone()]));
    assert!(claim(store, 10, lease).await.is_empty(), "leased");

    tokio::time::sleep(Duration::from_millis(450)).await;
    let second = claim(store, 10, HOUR).await;
    assert_eq!(ids(&second), HashSet::from([id.clone()]), "lease ran out");
    assert_eq!(second[0].polls, 2);
    assert!(second[0].lease_until > first[0].lease_until);

    // The first claimer comes back late: its release must not end the new lease.
    assert!(!release(store, &first[0], Some(Duration::ZERO)).await);
    assert!(claim(store, 10, HOUR).await.is_empty(), "still leased");
    assert!(release(store, &second[0], Some(Duration::ZERO)).await);
    assert_eq!(ids(&claim(store, 10, HOUR).await), HashSet::from([id]));
}

async fn release_schedules_the_next_poll_or_stops_polling(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let c = claim(store, 10, HOUR).await;
    assert!(release(store, &c[0], Some(Duration::from_millis(300))).await);
    assert!(claim(store, 10, HOUR).await.is_empty(), "not due yet");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let c = claim(store, 10, HOUR).await;
    assert_eq!(ids(&c), HashSet::from([id.clone()]), "due again");

    // Giving up: never claimed again, although the status is not final.
    assert!(release(store, &c[0], None).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(claim(store, 10, HOUR).await.is_empty(), "no longer polled");
    assert_eq!(status(store, &id).await, PushStatus::Accepted);
}

async fn a_final_status_is_not_overwritten_by_a_stale_one(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    assert!(
        write(
            store,
            &id,
            PushStatus::Cancelled,
            json!({"status": 4}),
            None
        )
        .await
    );
    // A poll that read "queued" before the cancel lands after it.
    let seen = record(store, &id).await.task_checked_at;
    assert!(!write(store, &id, PushStatus::Queued, json!({"status": 0}), seen).await);
    assert_eq!(status(store, &id).await, PushStatus::Cancelled);
    // A final state is never left, not even for another final state.
    assert!(!write(store, &id, PushStatus::Expired, json!({"status": 5}), seen).await);
    let r = record(store, &id).await;
    assert_eq!(r.status, PushStatus::Cancelled);
    assert_eq!(r.task_status, Some(json!({"status": 4})));
}

async fn tasks_of_apps_not_configured_here_are_left_due(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let polls = format!("select cast(poll_count as bigint) from pushes where id = '{id}'");
    let unscheduled =
        format!("select count(*) from pushes where id = '{id}' and next_poll_at is null");
    let other_app = [PolledApp {
        app: "other".into(),
        appkey: "appkey-other".into(),
    }];
    // The same name with another appkey (a drifted configuration) cannot sign for it either.
    let other_key = [PolledApp {
        app: "shop".into(),
        appkey: "appkey-other".into(),
    }];
    for apps in [&other_app[..], &other_key[..], &[]] {
        let got = store.claim_task_polls(10, HOUR, Duration::ZERO, apps).await;
        assert!(matches!(&got, Ok(v) if v.is_empty()), "{apps:?}: {got:?}");
    }
    assert_eq!(ctx.db.query_i64(&polls).await, 0, "never claimed");
    assert_eq!(
        ctx.db.query_i64(&unscheduled).await,
        1,
        "next poll unchanged"
    );

    // A replica that has the app finds it due.
    let got = claim(store, 10, HOUR).await;
    assert_eq!(ids(&got), HashSet::from([id]));
    assert_eq!(got[0].polls, 1);
    assert_eq!(got[0].appkey, APPKEY);
}

async fn task_states_only_move_forward(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let seen_at_accept = record(store, &id).await.task_checked_at;
    assert!(seen_at_accept.is_none());
    assert!(
        write(
            store,
            &id,
            PushStatus::Sending,
            json!({"status": 1, "sent_count": 5}),
            None
        )
        .await
    );
    let sending = record(store, &id).await;

    // A refresh that asked Umeng before the poller, and stores its answer after it.
    assert!(
        !write(
            store,
            &id,
            PushStatus::Queued,
            json!({"status": 0}),
            seen_at_accept
        )
        .await
    );
    assert!(
        !write(
            store,
            &id,
            PushStatus::Scheduled,
            json!({"status": 7}),
            seen_at_accept
        )
        .await
    );
    // Even one that read the newest state cannot move the task back.
    assert!(
        !write(
            store,
            &id,
            PushStatus::Queued,
            json!({"status": 0}),
            sending.task_checked_at
        )
        .await
    );
    // The same state from an answer older than the stored one is dropped too.
    assert!(
        !write(
            store,
            &id,
            PushStatus::Sending,
            json!({"status": 1, "sent_count": 2}),
            seen_at_accept
        )
        .await
    );
    let r = record(store, &id).await;
    assert_eq!(r.status, PushStatus::Sending);
    assert_eq!(r.task_status, Some(json!({"status": 1, "sent_count": 5})));
    assert_eq!(r.task_checked_at, sending.task_checked_at);

    // A newer answer of the same state updates the counters; a later state applies.
    assert!(
        write(
            store,
            &id,
            PushStatus::Sending,
            json!({"status": 1, "sent_count": 9}),
            sending.task_checked_at
        )
        .await
    );
    let r = record(store, &id).await;
    assert_eq!(r.task_status, Some(json!({"status": 1, "sent_count": 9})));
    assert!(r.task_checked_at > sending.task_checked_at);
    assert!(
        write(
            store,
            &id,
            PushStatus::Done,
            json!({"status": 2}),
            seen_at_accept
        )
        .await
    );
    assert_eq!(status(store, &id).await, PushStatus::Done);
}

async fn a_poll_answer_after_the_lease_was_taken_over_is_dropped(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let lease = Duration::from_millis(300);
    let first = claim(store, 10, lease).await;
    assert_eq!(ids(&first), HashSet::from([id.clone()]));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let second = claim(store, 10, HOUR).await;
    assert_eq!(ids(&second), HashSet::from([id.clone()]), "lease ran out");

    let poll = |c: &TaskClaim, status, data| TaskUpdate {
        status,
        task_status: data,
        seen_checked_at: c.task_checked_at,
        claim: Some(c.polls),
    };
    // The first poller's answer arrives late, even one that would move the task forward.
    let late = poll(&first[0], PushStatus::Sending, json!({"status": 1}));
    assert!(matches!(store.update_task(&id, late).await, Ok(false)));
    let late = poll(&first[0], PushStatus::Done, json!({"status": 2}));
    assert!(matches!(store.update_task(&id, late).await, Ok(false)));
    assert_eq!(status(store, &id).await, PushStatus::Accepted);
    // The current lease holder's answer is stored.
    let current = poll(&second[0], PushStatus::Queued, json!({"status": 0}));
    assert!(matches!(store.update_task(&id, current).await, Ok(true)));
    assert_eq!(status(store, &id).await, PushStatus::Queued);
}

async fn a_refresh_of_a_cancelled_task_keeps_who_cancelled_it(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let cancel = json!({"task_id": "t", "status": 4, "cancelled_by": "ops"});
    assert!(write(store, &id, PushStatus::Cancelled, cancel, None).await);
    // Umeng's own answer for the cancelled task carries counters but no cancelled_by.
    let seen = record(store, &id).await.task_checked_at;
    let umeng = json!({"task_id": "t", "status": 4, "sent_count": 3});
    assert!(write(store, &id, PushStatus::Cancelled, umeng, seen).await);
    let r = record(store, &id).await;
    assert_eq!(r.status, PushStatus::Cancelled);
    assert_eq!(
        r.task_status,
        Some(json!({"task_id": "t", "status": 4, "sent_count": 3, "cancelled_by": "ops"}))
    );
}

async fn task_lost_ends_polling_until_a_real_state_replaces_it(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = accepted_task(store).await;
    let c = claim(store, 10, HOUR).await;
    let lost = TaskUpdate {
        status: PushStatus::TaskLost,
        task_status: json!({"error_code": "1014", "error_msg": "task_id not found"}),
        seen_checked_at: c[0].task_checked_at,
        claim: Some(c[0].polls),
    };
    assert!(matches!(store.update_task(&id, lost).await, Ok(true)));
    assert!(release(store, &c[0], Some(Duration::ZERO)).await);
    assert!(
        claim(store, 10, HOUR).await.is_empty(),
        "task_lost is not polled"
    );
    assert_eq!(status(store, &id).await, PushStatus::TaskLost);

    // A refresh that reaches Umeng again and gets a real state corrects it.
    assert!(write(store, &id, PushStatus::Sending, json!({"status": 1}), None).await);
    assert_eq!(status(store, &id).await, PushStatus::Sending);
    assert!(write(store, &id, PushStatus::Done, json!({"status": 2}), None).await);
    // A final state is not given up for task_lost.
    let seen = record(store, &id).await.task_checked_at;
    assert!(!write(store, &id, PushStatus::TaskLost, json!({}), seen).await);
    assert_eq!(status(store, &id).await, PushStatus::Done);
}

/// Move rows back in time with the backend's own time representation.
async fn age(db: &TestDb, table: &str, column_filter: &str, by_days: i64) {
    let sql = match db {
        TestDb::Sqlite(_) => format!(
            "update {table} set created_at = created_at - {} where {column_filter}",
            by_days * 86_400_000
        ),
        TestDb::Postgres(_) => format!(
            "update {table} set created_at = created_at - interval '{by_days} days' \
             where {column_filter}"
        ),
    };
    db.execute(&sql).await;
}

async fn purge_deletes_old_rows_in_batches_and_keeps_young_ones(ctx: StoreCtx) {
    let store = &ctx.store;
    let daily = QuotaClaim {
        kind: QuotaKind::Broadcast,
        limit: QuotaLimit {
            limit: 100,
            window: WindowUnit::Day,
        },
    };
    let mut old = Vec::new();
    for i in 0..5 {
        let key = format!("old-{i}");
        old.push(admitted(store, push("broadcast", true, Some(&key)), Some(daily)).await);
    }
    let young = admitted(store, push("broadcast", true, Some("young")), Some(daily)).await;
    let list = old
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(", ");
    age(&ctx.db, "pushes", &format!("id in ({list})"), 100).await;
    // An old quota window and an old upload next to current ones.
    ctx.db
        .execute(&format!(
            "insert into quota_counters (appkey, kind, window_start, used) \
             values ('{APPKEY}', 'broadcast', 1600000000, 3)"
        ))
        .await;
    assert!(store
        .save_upload(APPKEY, "old-sha", "file-old")
        .await
        .is_ok());
    assert!(store
        .save_upload(APPKEY, "new-sha", "file-new")
        .await
        .is_ok());
    age(&ctx.db, "uploads", "content_sha256 = 'old-sha'", 40).await;

    let retention = 90 * DAY;
    assert_eq!(purge(store, PurgeTarget::Pushes, retention, 2).await, 2);
    assert_eq!(purge(store, PurgeTarget::Pushes, retention, 2).await, 2);
    assert_eq!(purge(store, PurgeTarget::Pushes, retention, 2).await, 1);
    assert_eq!(purge(store, PurgeTarget::Pushes, retention, 2).await, 0);
    for id in &old {
        assert!(matches!(store.get_push(id).await, Ok(None)), "{id} purged");
    }
    assert_eq!(status(store, &young).await, PushStatus::Pending);
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys")
            .await,
        1,
        "the keys of purged pushes went with them"
    );
    // A purged push's out_biz_no is free again.
    admitted(store, push("broadcast", true, Some("old-0")), None).await;

    assert_eq!(
        purge(store, PurgeTarget::QuotaCounters, 2 * DAY, 10).await,
        1
    );
    assert_eq!(
        purge(store, PurgeTarget::QuotaCounters, 2 * DAY, 10).await,
        0
    );
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from quota_counters")
            .await,
        1,
        "the current window is kept"
    );

    assert_eq!(purge(store, PurgeTarget::Uploads, 30 * DAY, 10).await, 1);
    assert!(matches!(
        store.find_upload(APPKEY, "new-sha", 3600).await,
        Ok(Some(f)) if f == "file-new"
    ));
    assert_eq!(ctx.db.query_i64("select count(*) from uploads").await, 1);
}
