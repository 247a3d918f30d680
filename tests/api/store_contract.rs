//! The store contract: every case runs against SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use umeng_push_gateway::quota::{QuotaKind, QuotaLimit, WindowUnit};
use umeng_push_gateway::store::{
    Admission, Attempt, Finish, HistoryCursor, NewPush, PoolOptions, PushQuery, PushStatus,
    QuotaAction, QuotaClaim, Store, TaskUpdate,
};

use crate::helpers::StoreCtx;

crate::store_cases!(
    migrate_is_idempotent,
    admit_finish_get_round_trip,
    history_filters_each_work,
    cursor_pagination_covers_every_row_once,
    quota_admits_up_to_the_limit_then_rate_limits,
    rate_limited_key_is_free_afterwards,
    concurrent_admissions_across_two_stores_respect_the_limit,
    concurrent_admissions_of_one_key_admit_one,
    repeat_after_accepted_replays_and_mismatch_is_reported,
    a_held_key_without_a_slot_is_answered_and_leaves_no_row,
    failed_push_key_is_reclaimed_once,
    unknown_task_class_reclaims_but_unknown_unicast_replays,
    refund_returns_the_slot_once_to_the_original_window,
    saturate_fills_the_window,
    finish_on_a_final_push_changes_nothing,
    sweep_marks_stale_pending_unknown,
    quota_state_reports_the_current_window,
    uploads_are_found_until_they_expire,
    update_task_records_status_and_times,
    cancelled_admissions_leave_no_open_transaction,
    late_outcome_replaces_the_sweepers_guess,
    late_outcome_after_a_reclaim_is_not_recorded,
    reclaiming_an_unknown_task_keeps_one_slot,
    saturate_marks_the_window_of_now,
    forgotten_uploads_are_not_found,
    counts_by_hour_group_status_and_error_code_within_the_allowed_apps,
    concurrent_outcomes_keep_the_counts_exact,
    a_failing_write_in_a_burst_fails_alone,
    a_failing_admission_beside_outcome_records_fails_alone,
    plain_admissions_and_kept_outcomes_released_together_answer_each,
);

const APPKEY: &str = "appkey-1";

fn groupcast(limit: u32) -> QuotaClaim {
    QuotaClaim {
        kind: QuotaKind::Groupcast,
        // A day window, so a test never straddles a window boundary in practice.
        limit: QuotaLimit {
            limit,
            window: WindowUnit::Day,
        },
    }
}

fn new_push(out_biz_no: Option<&str>) -> NewPush {
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: APPKEY.into(),
        platform: "android".into(),
        cast_type: "groupcast".into(),
        task_class: true,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: out_biz_no.map(str::to_owned),
        fingerprint: "fp-1".into(),
        request: json!({"type": "groupcast", "filter": {"where": {"and": [{"tag": "vip"}]}}}),
        description: Some("weekly digest".into()),
        send_at: None,
        delivery: None,
    }
}

fn unicast(out_biz_no: Option<&str>) -> NewPush {
    NewPush {
        cast_type: "unicast".into(),
        task_class: false,
        ..new_push(out_biz_no)
    }
}

fn finish(status: PushStatus, quota: QuotaAction) -> Finish {
    Finish {
        status,
        umeng_request: Some(
            serde_json::value::to_raw_value(
                &json!({"appkey": APPKEY, "timestamp": "1700000000000"}),
            )
            .unwrap(),
        ),
        umeng_response: Some(json!({"ret": "SUCCESS", "data": {"task_id": "t-1"}})),
        msg_id: None,
        task_id: Some("t-1".into()),
        file_id: None,
        error_code: None,
        error_msg: None,
        http_status: 200,
        latency_ms: Some(42),
        sent_at: None,
        quota,
        attempts: vec![Attempt {
            number: 1,
            call: "send".into(),
            started_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            outcome: "accepted".into(),
            error_code: None,
            latency_ms: 42,
        }],
        claim: None,
    }
}

fn failed() -> Finish {
    Finish {
        umeng_response: Some(json!({"ret": "FAIL", "data": {"error_code": "2003"}})),
        task_id: None,
        error_code: Some("2003".into()),
        error_msg: Some("bad filter".into()),
        http_status: 422,
        ..finish(PushStatus::Failed, QuotaAction::Refund)
    }
}

async fn admit(store: &Arc<dyn Store>, push: NewPush, quota: Option<QuotaClaim>) -> Admission {
    match store.admit(push, quota).await {
        Ok(a) => a,
        Err(e) => panic!("admit failed: {e}"),
    }
}

async fn admitted(store: &Arc<dyn Store>, push: NewPush, quota: Option<QuotaClaim>) -> String {
    match admit(store, push, quota).await {
        Admission::Admitted { push_id, .. } => push_id,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

async fn finish_ok(store: &Arc<dyn Store>, id: &str, f: Finish) -> bool {
    match store.finish(id, f.into()).await {
        Ok(changed) => changed,
        Err(e) => panic!("finish failed: {e}"),
    }
}

async fn get(store: &Arc<dyn Store>, id: &str) -> umeng_push_gateway::store::PushRecord {
    match store.get_push(id).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("push {id} not found"),
        Err(e) => panic!("get_push failed: {e}"),
    }
}

async fn list(store: &Arc<dyn Store>, query: PushQuery) -> Vec<String> {
    match store.list_pushes(&query).await {
        Ok(rows) => rows.into_iter().map(|r| r.id).collect(),
        Err(e) => panic!("list_pushes failed: {e}"),
    }
}

async fn used(store: &Arc<dyn Store>, limit: u32) -> u32 {
    let claim = groupcast(limit);
    match store.quota_state(APPKEY, claim.kind, claim.limit).await {
        Ok(s) => s.used,
        Err(e) => panic!("quota_state failed: {e}"),
    }
}

async fn db_now(store: &Arc<dyn Store>) -> OffsetDateTime {
    match store.now().await {
        Ok(t) => t,
        Err(e) => panic!("now failed: {e}"),
    }
}

fn all(limit: u32) -> PushQuery {
    PushQuery {
        limit,
        ..PushQuery::default()
    }
}

async fn migrate_is_idempotent(ctx: StoreCtx) {
    for _ in 0..2 {
        assert!(ctx.store.migrate().await.is_ok(), "migrate again");
    }
    assert!(ctx.store.ready().await.is_ok(), "ready after migrate");
    let again = ctx.db.connect_again().await;
    assert!(again.migrate().await.is_ok(), "migrate from a second store");
    let skew = (db_now(&ctx.store).await - OffsetDateTime::now_utc()).abs();
    assert!(
        skew < time::Duration::seconds(5),
        "database clock is off by {skew}"
    );
}

async fn admit_finish_get_round_trip(ctx: StoreCtx) {
    // Arrange
    let store = &ctx.store;
    let push = new_push(Some("biz-1"));
    let id = push.id.clone();
    let before = db_now(store).await;

    // Act: admit
    let admission = admit(store, push.clone(), Some(groupcast(5))).await;

    // Assert: admitted with the quota state, and a pending row
    let Admission::Admitted {
        push_id,
        quota: Some(quota),
        reclaimed_from: None,
    } = admission
    else {
        panic!("expected a fresh admission, got {admission:?}");
    };
    assert_eq!(push_id, id);
    assert_eq!(
        (quota.used, quota.limit, quota.window),
        (1, 5, WindowUnit::Day)
    );
    let window = WindowUnit::Day.window_start(before.unix_timestamp());
    assert_eq!(quota.window_start, window);
    let pending = get(store, &id).await;
    assert_eq!(pending.status, PushStatus::Pending);
    assert_eq!(pending.finished_at, None);

    // Act: finish with every field
    let sent_at = OffsetDateTime::from_unix_timestamp(1_800_000_000).ok();
    let done = Finish {
        msg_id: Some("m-1".into()),
        file_id: Some("f-1".into()),
        error_code: Some("none".into()),
        error_msg: Some("all good".into()),
        http_status: 202,
        latency_ms: Some(137),
        sent_at,
        ..finish(PushStatus::Accepted, QuotaAction::Keep)
    };
    assert!(finish_ok(store, &id, done.clone()).await);

    // Assert: every field
    let r = get(store, &id).await;
    assert_eq!(r.id, id);
    assert_eq!(r.app, push.app);
    assert_eq!(r.appkey, push.appkey);
    assert_eq!(r.platform, push.platform);
    assert_eq!(r.cast_type, push.cast_type);
    assert_eq!(r.task_class, push.task_class);
    assert_eq!(r.production_mode, push.production_mode);
    assert_eq!(r.client, push.client);
    assert_eq!(r.out_biz_no, push.out_biz_no);
    assert_eq!(r.fingerprint, push.fingerprint);
    assert_eq!(r.status, PushStatus::Accepted);
    assert_eq!(r.description, push.description);
    assert_eq!(r.request, push.request);
    assert_eq!(
        r.umeng_request,
        done.umeng_request
            .map(|sent| serde_json::from_str::<serde_json::Value>(sent.get()).unwrap())
    );
    assert_eq!(r.umeng_response, done.umeng_response);
    assert_eq!(r.msg_id, done.msg_id);
    assert_eq!(r.task_id, done.task_id);
    assert_eq!(r.file_id, done.file_id);
    assert_eq!(r.error_code, done.error_code);
    assert_eq!(r.error_msg, done.error_msg);
    assert_eq!(r.http_status, Some(202));
    assert_eq!(r.quota_kind, Some(QuotaKind::Groupcast));
    assert_eq!(r.quota_window, Some(window));
    assert!(!r.quota_refunded);
    assert_eq!(r.task_status, None);
    assert_eq!(r.task_checked_at, None);
    assert_eq!(r.latency_ms, Some(137));
    assert_eq!(r.attempts, done.attempts);
    assert_eq!(r.sent_at, sent_at);
    let slack = time::Duration::seconds(5);
    assert!(r.created_at >= before - slack && r.created_at <= before + slack);
    let finished_at = r.finished_at.unwrap_or(OffsetDateTime::UNIX_EPOCH);
    assert!(
        finished_at >= r.created_at,
        "finished_at {finished_at} < created_at"
    );
    assert!(r.updated_at >= r.created_at);
    assert_eq!(used(store, 5).await, 1, "accepted keeps its slot");

    // A push without key or quota has neither.
    let plain = admit(store, unicast(None), None).await;
    let Admission::Admitted {
        push_id,
        quota: None,
        reclaimed_from: None,
    } = plain
    else {
        panic!("expected a plain admission, got {plain:?}");
    };
    let r = get(store, &push_id).await;
    assert_eq!(
        (r.out_biz_no, r.quota_kind, r.quota_window),
        (None, None, None)
    );
    assert!(matches!(store.get_push("no-such-id").await, Ok(None)));
}

async fn history_filters_each_work(ctx: StoreCtx) {
    // Arrange: five pushes differing in one attribute each
    let store = &ctx.store;
    let a = admitted(store, new_push(Some("biz-a")), None).await;
    let b = admitted(
        store,
        NewPush {
            app: "news".into(),
            ..new_push(None)
        },
        None,
    )
    .await;
    let c = admitted(
        store,
        NewPush {
            client: "ops".into(),
            ..unicast(None)
        },
        None,
    )
    .await;
    let d = admitted(store, new_push(None), None).await;
    let e = admitted(store, new_push(None), None).await;
    let with_msg = Finish {
        msg_id: Some("msg-c".into()),
        task_id: None,
        ..failed()
    };
    assert!(finish_ok(store, &c, with_msg).await);
    let with_task = Finish {
        task_id: Some("task-d".into()),
        ..finish(PushStatus::Accepted, QuotaAction::Keep)
    };
    assert!(finish_ok(store, &d, with_task).await);
    let q = |f: fn(&mut PushQuery)| {
        let mut query = all(50);
        f(&mut query);
        query
    };

    // Act + Assert
    assert_eq!(
        list(store, q(|q| q.app = Some("news".into()))).await,
        vec![b.clone()]
    );
    assert_eq!(
        list(
            store,
            q(|q| q.apps_allowed = Some(vec!["news".into(), "other".into()]))
        )
        .await,
        vec![b.clone()]
    );
    assert!(list(store, q(|q| q.apps_allowed = Some(vec![])))
        .await
        .is_empty());
    assert_eq!(
        list(store, q(|q| q.cast_type = Some("unicast".into()))).await,
        vec![c.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.status = Some(PushStatus::Failed))).await,
        vec![c.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.status = Some(PushStatus::Accepted))).await,
        vec![d.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.status = Some(PushStatus::Pending))).await,
        vec![e.clone(), b.clone(), a.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.client = Some("ops".into()))).await,
        vec![c.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.out_biz_no = Some("biz-a".into()))).await,
        vec![a.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.msg_id = Some("msg-c".into()))).await,
        vec![c.clone()]
    );
    assert_eq!(
        list(store, q(|q| q.task_id = Some("task-d".into()))).await,
        vec![d.clone()]
    );
    // ANDed: the right app but the wrong client matches nothing.
    assert!(list(
        store,
        q(|q| {
            q.app = Some("news".into());
            q.client = Some("ops".into());
        })
    )
    .await
    .is_empty());

    // Time range: everything is inside [created - 1h, created + 1h), nothing before.
    let created = get(store, &a).await.created_at;
    let hour = time::Duration::hours(1);
    let mut range = all(50);
    range.from = Some(created - hour);
    range.to = Some(created + hour);
    assert_eq!(list(store, range.clone()).await.len(), 5);
    range.to = Some(created - time::Duration::minutes(1));
    assert!(list(store, range).await.is_empty());
    let mut later = all(50);
    later.from = Some(created + hour);
    assert!(list(store, later).await.is_empty());

    // Limit
    assert_eq!(list(store, all(2)).await, vec![e, d]);
}

async fn cursor_pagination_covers_every_row_once(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(admitted(store, new_push(None), None).await);
    }
    ids.sort_unstable_by(|a, b| b.cmp(a)); // newest first

    let mut seen = Vec::new();
    let mut query = all(3);
    let mut pages = 0;
    loop {
        let page = match store.list_pushes(&query).await {
            Ok(rows) => rows,
            Err(e) => panic!("list_pushes failed: {e}"),
        };
        assert!(page.len() <= 3, "limit honoured");
        pages += 1;
        let Some(last) = page.last() else {
            break;
        };
        query.before = Some(HistoryCursor::after(last));
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, ids, "every row exactly once, newest first");
    assert_eq!(pages, 4, "3 + 3 + 1, then an empty page");
}

async fn quota_admits_up_to_the_limit_then_rate_limits(ctx: StoreCtx) {
    let store = &ctx.store;
    for n in 1..=5 {
        match admit(
            store,
            new_push(Some(&format!("biz-{n}"))),
            Some(groupcast(5)),
        )
        .await
        {
            Admission::Admitted { quota: Some(q), .. } => assert_eq!(q.used, n),
            other => panic!("admission {n}: {other:?}"),
        }
    }
    let now = db_now(store).await.unix_timestamp();

    let limited = admit(store, new_push(Some("biz-6")), Some(groupcast(5))).await;

    let Admission::RateLimited { quota } = limited else {
        panic!("expected RateLimited, got {limited:?}");
    };
    assert_eq!(
        (quota.used, quota.limit, quota.kind),
        (5, 5, QuotaKind::Groupcast)
    );
    assert_eq!(quota.window_start, WindowUnit::Day.window_start(now));
    let expected_reset = quota.window_start + 86_400 - now;
    assert!(
        (quota.reset_after_secs - expected_reset).abs() <= 2 && quota.reset_after_secs >= 1,
        "reset_after_secs {} vs {expected_reset}",
        quota.reset_after_secs
    );
    assert_eq!(
        list(store, all(50)).await.len(),
        5,
        "no row for the rate-limited push"
    );
    assert!(list(
        store,
        PushQuery {
            out_biz_no: Some("biz-6".into()),
            ..all(50)
        }
    )
    .await
    .is_empty());
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys")
            .await,
        5
    );
    assert_eq!(used(store, 5).await, 5);
}

async fn rate_limited_key_is_free_afterwards(ctx: StoreCtx) {
    let store = &ctx.store;
    let first = admitted(store, new_push(Some("biz-1")), Some(groupcast(1))).await;
    let limited = admit(store, new_push(Some("biz-2")), Some(groupcast(1))).await;
    assert!(
        matches!(limited, Admission::RateLimited { .. }),
        "{limited:?}"
    );

    // The admitted key names a push; the rejected one names none, for this appkey only.
    let taken = |appkey: &'static str, key: &'static str| store.key_taken(appkey, key);
    assert!(taken(APPKEY, "biz-1").await.unwrap());
    assert!(!taken(APPKEY, "biz-2").await.unwrap());
    assert!(!taken("appkey-2", "biz-1").await.unwrap());

    // A slot comes back; the rejected key was never claimed.
    assert!(finish_ok(store, &first, failed()).await);
    assert!(
        taken(APPKEY, "biz-1").await.unwrap(),
        "a failed push still names its key"
    );
    let again = admit(store, new_push(Some("biz-2")), Some(groupcast(1))).await;
    assert!(taken(APPKEY, "biz-2").await.unwrap());

    assert!(
        matches!(
            again,
            Admission::Admitted {
                reclaimed_from: None,
                ..
            }
        ),
        "expected a fresh admission, got {again:?}"
    );
}

async fn concurrent_admissions_across_two_stores_respect_the_limit(ctx: StoreCtx) {
    let stores = [ctx.store.clone(), ctx.db.connect_again().await];
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (store, barrier) = (stores[i % 2].clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            store
                .admit(new_push(Some(&format!("biz-{i}"))), Some(groupcast(5)))
                .await
        });
    }
    let (mut ok, mut limited) = (0, 0);
    for result in set.join_all().await {
        match result {
            Ok(Admission::Admitted { .. }) => ok += 1,
            Ok(Admission::RateLimited { .. }) => limited += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok, limited), (5, 35));
    assert_eq!(used(&ctx.store, 5).await, 5);
    assert_eq!(list(&ctx.store, all(50)).await.len(), 5);
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys")
            .await,
        5
    );
}

async fn concurrent_admissions_of_one_key_admit_one(ctx: StoreCtx) {
    let stores = [ctx.store.clone(), ctx.db.connect_again().await];
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (store, barrier) = (stores[i % 2].clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            store
                .admit(new_push(Some("same-key")), Some(groupcast(100)))
                .await
        });
    }
    let mut winner = None;
    let mut in_flight = Vec::new();
    for result in set.join_all().await {
        match result {
            Ok(Admission::Admitted { push_id, .. }) => {
                assert!(
                    winner.replace(push_id).is_none(),
                    "two admissions of one key"
                )
            }
            Ok(Admission::InFlight { push_id }) => in_flight.push(push_id),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let winner = winner.unwrap_or_default();
    assert_eq!(in_flight.len(), 19);
    assert!(
        in_flight.iter().all(|id| *id == winner),
        "InFlight names the owner"
    );
    assert_eq!(used(&ctx.store, 100).await, 1, "one slot taken");
    assert_eq!(list(&ctx.store, all(50)).await, vec![winner]);
}

async fn repeat_after_accepted_replays_and_mismatch_is_reported(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(Some("biz-1")), Some(groupcast(5))).await;
    assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);

    let replay = admit(store, new_push(Some("biz-1")), Some(groupcast(5))).await;
    let changed = NewPush {
        fingerprint: "fp-2".into(),
        ..new_push(Some("biz-1"))
    };
    let mismatch = admit(store, changed, Some(groupcast(5))).await;

    match replay {
        Admission::Replay { push } => {
            assert_eq!(
                (push.id.as_str(), push.status),
                (id.as_str(), PushStatus::Accepted)
            );
            assert_eq!(push.http_status, Some(200));
        }
        other => panic!("expected Replay, got {other:?}"),
    }
    assert!(
        matches!(&mismatch, Admission::Mismatch { push_id } if *push_id == id),
        "{mismatch:?}"
    );
    assert_eq!(used(store, 5).await, 1, "neither took a slot");
    assert_eq!(list(store, all(50)).await.len(), 1, "neither wrote a row");
    // The same out_biz_no under another appkey is another key.
    let other = NewPush {
        appkey: "appkey-2".into(),
        ..new_push(Some("biz-1"))
    };
    assert!(matches!(
        admit(store, other, None).await,
        Admission::Admitted { .. }
    ));
}

/// Keyed pushes that count in no bucket: a key no push holds is claimed with the row, and
/// a held one is answered as it is (in flight, mismatch, replay) with nothing written.
async fn a_held_key_without_a_slot_is_answered_and_leaves_no_row(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, unicast(Some("u-1")), None).await;

    let in_flight = admit(store, unicast(Some("u-1")), None).await;
    let changed = NewPush {
        fingerprint: "fp-2".into(),
        ..unicast(Some("u-1"))
    };
    let mismatch = admit(store, changed, None).await;
    assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);
    let replay = admit(store, unicast(Some("u-1")), None).await;

    assert!(
        matches!(&in_flight, Admission::InFlight { push_id } if *push_id == id),
        "{in_flight:?}"
    );
    assert!(
        matches!(&mismatch, Admission::Mismatch { push_id } if *push_id == id),
        "{mismatch:?}"
    );
    assert!(
        matches!(&replay, Admission::Replay { push } if push.id == id),
        "{replay:?}"
    );
    assert_eq!(
        list(store, all(50)).await,
        vec![id.clone()],
        "no row but the first"
    );
    assert!(store.key_taken(APPKEY, "u-1").await.unwrap());
    let record = store.get_push(&id).await.unwrap().expect("the first push");
    assert_eq!(record.status, PushStatus::Accepted);
}

async fn failed_push_key_is_reclaimed_once(ctx: StoreCtx) {
    let store = &ctx.store;
    let first = admitted(store, new_push(Some("biz-1")), Some(groupcast(100))).await;
    assert!(finish_ok(store, &first, failed()).await);

    let retry = admit(store, new_push(Some("biz-1")), Some(groupcast(100))).await;
    let Admission::Admitted {
        push_id: second,
        reclaimed_from,
        quota: Some(q),
    } = retry
    else {
        panic!("expected a reclaim, got {retry:?}");
    };
    assert_eq!(reclaimed_from.as_deref(), Some(first.as_str()));
    assert_eq!(q.used, 1, "the refunded slot was taken again");
    assert!(finish_ok(store, &second, failed()).await);

    // Concurrent retries after a failure: exactly one takes the key over.
    let stores = [ctx.store.clone(), ctx.db.connect_again().await];
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let (store, barrier) = (stores[i % 2].clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            store
                .admit(new_push(Some("biz-1")), Some(groupcast(100)))
                .await
        });
    }
    let (mut reclaimed, mut in_flight) = (0, 0);
    for result in set.join_all().await {
        match result {
            Ok(Admission::Admitted { reclaimed_from, .. }) => {
                assert_eq!(reclaimed_from.as_deref(), Some(second.as_str()));
                reclaimed += 1;
            }
            Ok(Admission::InFlight { .. }) => in_flight += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((reclaimed, in_flight), (1, 9));
    assert_eq!(used(store, 100).await, 1);
}

async fn unknown_task_class_reclaims_but_unknown_unicast_replays(ctx: StoreCtx) {
    let store = &ctx.store;
    let unknown = || Finish {
        http_status: 202,
        ..finish(PushStatus::Unknown, QuotaAction::Keep)
    };
    let task = admitted(store, new_push(Some("task-1")), None).await;
    assert!(finish_ok(store, &task, unknown()).await);
    let uni = admitted(store, unicast(Some("uni-1")), None).await;
    assert!(finish_ok(store, &uni, unknown()).await);

    let task_retry = admit(store, new_push(Some("task-1")), None).await;
    let uni_retry = admit(store, unicast(Some("uni-1")), None).await;

    assert!(
        matches!(&task_retry, Admission::Admitted { reclaimed_from: Some(old), .. } if *old == task),
        "{task_retry:?}"
    );
    match uni_retry {
        Admission::Replay { push } => {
            assert_eq!((push.id, push.status), (uni, PushStatus::Unknown))
        }
        other => panic!("expected Replay, got {other:?}"),
    }
}

async fn refund_returns_the_slot_once_to_the_original_window(ctx: StoreCtx) {
    // Arrange: push A took its slot "yesterday" (moved back one day), B takes one today.
    let store = &ctx.store;
    let a = admitted(store, new_push(None), Some(groupcast(5))).await;
    ctx.db
        .execute("update quota_counters set window_start = window_start - 86400")
        .await;
    ctx.db
        .execute("update pushes set quota_window = quota_window - 86400")
        .await;
    let b = admitted(store, new_push(None), Some(groupcast(5))).await;
    assert_eq!(used(store, 5).await, 1);

    // Act: refund A twice
    let first = finish_ok(store, &a, failed()).await;
    let second = finish_ok(store, &a, failed()).await;

    // Assert
    assert!(first && !second);
    assert!(get(store, &a).await.quota_refunded);
    assert_eq!(used(store, 5).await, 1, "today's window untouched");
    let old = "select cast(used as bigint) from quota_counters where window_start = \
               (select min(window_start) from quota_counters)";
    assert_eq!(
        ctx.db.query_i64(old).await,
        0,
        "yesterday's slot given back once"
    );

    // Refunds never go below zero, and B's refund goes to today.
    assert!(finish_ok(store, &b, failed()).await);
    assert_eq!(used(store, 5).await, 0);
    assert_eq!(
        ctx.db
            .query_i64("select cast(min(used) as bigint) from quota_counters")
            .await,
        0
    );
}

async fn saturate_fills_the_window(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(None), Some(groupcast(5))).await;
    let quota_full = Finish {
        error_code: Some("2050".into()),
        http_status: 429,
        ..finish(PushStatus::Failed, QuotaAction::Saturate(WindowUnit::Day))
    };

    assert!(finish_ok(store, &id, quota_full).await);

    assert_eq!(used(store, 5).await, 5);
    assert!(!get(store, &id).await.quota_refunded);
    let next = admit(store, new_push(None), Some(groupcast(5))).await;
    assert!(
        matches!(next, Admission::RateLimited { quota } if quota.used == 5),
        "{next:?}"
    );
}

async fn finish_on_a_final_push_changes_nothing(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(Some("biz-1")), Some(groupcast(5))).await;
    assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);
    let before = get(store, &id).await;

    let late = finish_ok(store, &id, failed()).await;
    let saturate = finish_ok(
        store,
        &id,
        finish(PushStatus::Failed, QuotaAction::Saturate(WindowUnit::Day)),
    )
    .await;

    assert!(!late && !saturate);
    let after = get(store, &id).await;
    assert_eq!(after.status, PushStatus::Accepted);
    assert_eq!((after.error_code, after.http_status), (None, Some(200)));
    assert_eq!(after.updated_at, before.updated_at);
    assert!(!after.quota_refunded);
    assert_eq!(used(store, 5).await, 1);
    assert!(!finish_ok(store, "no-such-id", failed()).await);
}

async fn sweep_marks_stale_pending_unknown(ctx: StoreCtx) {
    let store = &ctx.store;
    let stale = admitted(store, new_push(None), Some(groupcast(5))).await;
    let done = admitted(store, new_push(None), None).await;
    assert!(
        finish_ok(
            store,
            &done,
            finish(PushStatus::Accepted, QuotaAction::Keep)
        )
        .await
    );
    tokio::time::sleep(Duration::from_millis(20)).await;

    let young = store.sweep_stale_pending(3600).await.ok();
    let swept = store.sweep_stale_pending(0).await.ok();

    assert_eq!((young, swept), (Some(0), Some(1)));
    let r = get(store, &stale).await;
    assert_eq!(r.status, PushStatus::Unknown);
    assert_eq!(r.error_code.as_deref(), Some("stale_pending"));
    assert!(r.finished_at.is_some());
    assert_eq!(used(store, 5).await, 1, "quota kept");
    assert_eq!(get(store, &done).await.status, PushStatus::Accepted);
    assert!(
        finish_ok(store, &stale, failed()).await,
        "a late real outcome replaces the sweeper's guess"
    );
    assert_eq!(get(store, &stale).await.status, PushStatus::Failed);
    assert!(
        !finish_ok(
            store,
            &stale,
            finish(PushStatus::Accepted, QuotaAction::Keep)
        )
        .await,
        "but not another real outcome"
    );
}

async fn quota_state_reports_the_current_window(ctx: StoreCtx) {
    let store = &ctx.store;
    let hourly = QuotaLimit {
        limit: 300,
        window: WindowUnit::Hour,
    };
    let now = db_now(store).await.unix_timestamp();

    let empty = store
        .quota_state(APPKEY, QuotaKind::Filecast, hourly)
        .await
        .ok();
    let claim = QuotaClaim {
        kind: QuotaKind::Filecast,
        limit: hourly,
    };
    admitted(store, new_push(None), Some(claim)).await;
    let one = store
        .quota_state(APPKEY, QuotaKind::Filecast, hourly)
        .await
        .ok();
    let other_app = store
        .quota_state("appkey-2", QuotaKind::Filecast, hourly)
        .await
        .ok();
    let other_kind = store
        .quota_state(APPKEY, QuotaKind::Broadcast, hourly)
        .await
        .ok();

    let Some(empty) = empty else {
        panic!("quota_state failed")
    };
    assert_eq!(
        (empty.used, empty.limit, empty.window),
        (0, 300, WindowUnit::Hour)
    );
    assert_eq!(empty.window_start, WindowUnit::Hour.window_start(now));
    assert!((1..=3600).contains(&empty.reset_after_secs));
    assert_eq!(one.map(|s| s.used), Some(1));
    assert_eq!(other_app.map(|s| s.used), Some(0));
    assert_eq!(other_kind.map(|s| s.used), Some(0));
}

async fn uploads_are_found_until_they_expire(ctx: StoreCtx) {
    let store = &ctx.store;
    let sha = "ab".repeat(32);
    assert!(matches!(
        store.find_upload(APPKEY, &sha, 3600).await,
        Ok(None)
    ));

    assert!(store.save_upload(APPKEY, &sha, "file-1").await.is_ok());
    assert_eq!(
        store
            .find_upload(APPKEY, &sha, 3600)
            .await
            .ok()
            .flatten()
            .as_deref(),
        Some("file-1")
    );
    assert!(store.save_upload(APPKEY, &sha, "file-2").await.is_ok());
    assert_eq!(
        store
            .find_upload(APPKEY, &sha, 3600)
            .await
            .ok()
            .flatten()
            .as_deref(),
        Some("file-2")
    );
    assert!(matches!(
        store.find_upload("appkey-2", &sha, 3600).await,
        Ok(None)
    ));
    assert!(matches!(
        store.find_upload(APPKEY, &"cd".repeat(32), 3600).await,
        Ok(None)
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        matches!(store.find_upload(APPKEY, &sha, 0).await, Ok(None)),
        "too old"
    );
}

async fn update_task_records_status_and_times(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(None), None).await;
    let update = |status, task_status, seen| TaskUpdate {
        status,
        task_status,
        seen_checked_at: seen,
        claim: None,
    };
    let queued = update(PushStatus::Queued, json!({"status": 0}), None);
    assert!(matches!(
        store.update_task(&id, queued.clone()).await,
        Ok(false)
    ));
    assert_eq!(
        get(store, &id).await.status,
        PushStatus::Pending,
        "a pending push is left alone"
    );
    assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);
    let accepted_at = get(store, &id).await.finished_at;

    assert!(matches!(store.update_task(&id, queued).await, Ok(true)));
    let r = get(store, &id).await;
    assert_eq!(r.status, PushStatus::Queued);
    assert_eq!(r.task_status, Some(json!({"status": 0})));
    let first_check = r.task_checked_at;
    assert!(first_check.is_some());
    assert_eq!(r.finished_at, accepted_at, "not final yet");

    tokio::time::sleep(Duration::from_millis(20)).await;
    let done = update(
        PushStatus::Done,
        json!({"status": 2, "sent_count": 10}),
        first_check,
    );
    assert!(matches!(
        store.update_task(&id, done.clone()).await,
        Ok(true)
    ));
    let r = get(store, &id).await;
    assert_eq!(r.status, PushStatus::Done);
    assert_eq!(r.task_status, Some(done.task_status.clone()));
    assert!(r.task_checked_at > first_check);
    assert!(
        r.finished_at > accepted_at,
        "finished when the task reached a final state"
    );
    let final_at = r.finished_at;

    // A later poll of the finished task refreshes its counters, not finished_at.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = update(
        PushStatus::Done,
        json!({"status": 2, "sent_count": 12}),
        r.task_checked_at,
    );
    assert!(matches!(store.update_task(&id, later).await, Ok(true)));
    let r = get(store, &id).await;
    assert_eq!(r.task_status, Some(json!({"status": 2, "sent_count": 12})));
    assert_eq!(r.finished_at, final_at, "later polls keep finished_at");
}

async fn cancelled_admissions_leave_no_open_transaction(ctx: StoreCtx) {
    // Arrange: one connection, so a poisoned connection would break everything after.
    let options = PoolOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        ..PoolOptions::default()
    };
    let store = ctx.db.connect_with(&options).await;

    // Act: drop admissions at many points in flight.
    let mut dropped = 0;
    for i in 0..40u64 {
        let push = new_push(Some(&format!("biz-{}", i % 5)));
        let future = store.admit(push, Some(groupcast(1000)));
        // Half are dropped right after their first poll (always mid-flight, however
        // loaded the machine is); the rest after a growing delay.
        let cancelled = if i % 2 == 0 {
            futures::FutureExt::now_or_never(future).is_none()
        } else {
            tokio::time::timeout(Duration::from_micros(i * 50), future)
                .await
                .is_err()
        };
        if cancelled {
            dropped += 1;
        }
    }
    assert!(
        dropped > 0,
        "no admission was cancelled; the test proves nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Assert: the single connection still works, and no session sits in a transaction.
    for i in 0..5 {
        let next = admit(
            &store,
            new_push(Some(&format!("after-{i}"))),
            Some(groupcast(1000)),
        )
        .await;
        assert!(matches!(next, Admission::Admitted { .. }), "{next:?}");
    }
    let rows = list(&store, all(200)).await;
    assert!(rows.len() >= 5);
    assert!(store.ready().await.is_ok());
    assert_eq!(ctx.db.idle_in_transaction().await, 0);
    // Keys taken by dropped-but-completed admissions are consistent: each names a stored push.
    let orphans = ctx
        .db
        .query_i64(
            "select count(*) from idempotency_keys k where not exists \
                    (select 1 from pushes p where p.id = k.push_id)",
        )
        .await;
    assert_eq!(orphans, 0);
}

async fn late_outcome_replaces_the_sweepers_guess(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(Some("slow-1")), Some(groupcast(5))).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.sweep_stale_pending(0).await.ok(), Some(1));
    assert_eq!(get(store, &id).await.status, PushStatus::Unknown);

    let late = finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await;

    assert!(late, "the real outcome is recorded");
    let r = get(store, &id).await;
    assert_eq!(r.status, PushStatus::Accepted);
    assert_eq!(r.task_id.as_deref(), Some("t-1"));
    assert_eq!(r.error_code, None);
    assert_eq!(used(store, 5).await, 1, "one slot, kept");
    // The repeat replays the real outcome.
    match admit(store, new_push(Some("slow-1")), Some(groupcast(5))).await {
        Admission::Replay { push } => assert_eq!(push.status, PushStatus::Accepted),
        other => panic!("expected Replay, got {other:?}"),
    }
}

async fn late_outcome_after_a_reclaim_is_not_recorded(ctx: StoreCtx) {
    let store = &ctx.store;
    let first = admitted(store, new_push(Some("slow-2")), None).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.sweep_stale_pending(0).await.ok(), Some(1));
    let retry = admit(store, new_push(Some("slow-2")), None).await;
    assert!(
        matches!(&retry, Admission::Admitted { reclaimed_from: Some(old), .. } if *old == first),
        "{retry:?}"
    );

    let late = finish_ok(
        store,
        &first,
        finish(PushStatus::Accepted, QuotaAction::Keep),
    )
    .await;

    assert!(!late, "the key belongs to the retry now");
    assert_eq!(get(store, &first).await.status, PushStatus::Unknown);
}

async fn reclaiming_an_unknown_task_keeps_one_slot(ctx: StoreCtx) {
    let store = &ctx.store;
    let unknown = Finish {
        error_code: Some("timeout".into()),
        ..finish(PushStatus::Unknown, QuotaAction::Keep)
    };
    let first = admitted(store, new_push(Some("t-unknown")), Some(groupcast(1))).await;
    assert!(finish_ok(store, &first, unknown.clone()).await);
    assert_eq!(used(store, 1).await, 1);

    // The window is full, but the retry is the same logical push (Umeng dedupes it by
    // out_biz_no): it takes over the slot instead of a second one.
    let retry = admit(store, new_push(Some("t-unknown")), Some(groupcast(1))).await;
    let second = match retry {
        Admission::Admitted {
            push_id,
            reclaimed_from,
            quota,
        } => {
            assert_eq!(reclaimed_from.as_deref(), Some(first.as_str()));
            assert_eq!(quota.map(|q| q.used), Some(1));
            push_id
        }
        other => panic!("expected Admitted, got {other:?}"),
    };
    assert_eq!(used(store, 1).await, 1);
    assert!(get(store, &first).await.quota_refunded);

    // Unknown again, and again retried: still one slot.
    assert!(finish_ok(store, &second, unknown).await);
    assert!(matches!(
        admit(store, new_push(Some("t-unknown")), Some(groupcast(1))).await,
        Admission::Admitted { .. }
    ));
    assert_eq!(used(store, 1).await, 1);
    // Another push still finds the window full.
    assert!(matches!(
        admit(store, new_push(None), Some(groupcast(1))).await,
        Admission::RateLimited { .. }
    ));
}

async fn saturate_marks_the_window_of_now(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, new_push(None), Some(groupcast(5))).await;
    // The slot came from yesterday's window (the send straddled midnight).
    ctx.db
        .execute("update pushes set quota_window = quota_window - 86400")
        .await;
    ctx.db
        .execute("update quota_counters set window_start = window_start - 86400")
        .await;
    let quota_full = Finish {
        error_code: Some("2050".into()),
        ..finish(PushStatus::Failed, QuotaAction::Saturate(WindowUnit::Day))
    };

    assert!(finish_ok(store, &id, quota_full).await);

    assert_eq!(used(store, 5).await, 5, "today's window is full");
    let yesterday = "select cast(used as bigint) from quota_counters where window_start = \
                     (select min(window_start) from quota_counters)";
    assert_eq!(
        ctx.db.query_i64(yesterday).await,
        1,
        "yesterday's untouched"
    );
}

async fn forgotten_uploads_are_not_found(ctx: StoreCtx) {
    let store = &ctx.store;
    let sha = "ef".repeat(32);
    assert!(store.save_upload(APPKEY, &sha, "file-1").await.is_ok());

    // A forget naming another file_id (a newer upload replaced it) changes nothing.
    assert!(store.forget_upload(APPKEY, &sha, "file-0").await.is_ok());
    let kept = store.find_upload(APPKEY, &sha, 3600).await.ok().flatten();
    assert!(store.forget_upload(APPKEY, &sha, "file-1").await.is_ok());
    let gone = store.find_upload(APPKEY, &sha, 3600).await.ok().flatten();

    assert_eq!((kept.as_deref(), gone), (Some("file-1"), None));
}

/// Admission resolves the key and the quota before it writes the row: replays, 409s and
/// 429s of a large request write nothing (no dead tuples, no TOAST growth).
#[tokio::test]
async fn postgres_rejections_write_no_row() {
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    let store = &ctx.store;
    // Random hex: TOAST compression must not hide the size.
    let lines: String = (0..32_768)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let big = |key: &str| NewPush {
        request: json!({ "file_lines": lines }),
        ..new_push(Some(key))
    };
    let owner = admitted(store, big("big-1"), Some(groupcast(1))).await;
    let size = "select pg_total_relation_size('pushes')";
    let before = ctx.db.query_i64(size).await;

    for _ in 0..5 {
        // In flight (409), then the window is full (429).
        assert!(matches!(
            admit(store, big("big-1"), Some(groupcast(1))).await,
            Admission::InFlight { .. }
        ));
        assert!(matches!(
            admit(store, big("big-2"), Some(groupcast(1))).await,
            Admission::RateLimited { .. }
        ));
    }
    assert!(
        finish_ok(
            store,
            &owner,
            finish(PushStatus::Accepted, QuotaAction::Keep)
        )
        .await
    );
    for _ in 0..5 {
        assert!(matches!(
            admit(store, big("big-1"), Some(groupcast(1))).await,
            Admission::Replay { .. }
        ));
    }

    let growth = ctx.db.query_i64(size).await - before;
    assert!(growth < 512 * 1024, "pushes grew by {growth} bytes");
    assert_eq!(ctx.db.query_i64("select count(*) from pushes").await, 1);
}

#[tokio::test]
async fn postgres_sessions_carry_timeouts() {
    if crate::helpers::skip_postgres() {
        return;
    }
    let (_store, db) = crate::helpers::postgres_store().await;
    let pg = umeng_push_gateway::store::postgres::PgStore::connect(
        db.url(),
        &crate::helpers::test_pool_options(),
    )
    .await;
    let Ok(pg) = pg else { panic!("connect failed") };

    let mut settings = Vec::new();
    for name in [
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "jit",
    ] {
        let value: Result<String, _> = sqlx::query_scalar(&format!("show {name}"))
            .fetch_one(pg.pool())
            .await;
        settings.push(value.unwrap_or_default());
    }

    assert_eq!(settings, ["5s", "2s", "10s", "off"]);
}

/// Sequential admission latency per backend (run with `--ignored --nocapture`).
#[tokio::test]
#[ignore = "timing, not a check"]
async fn admission_latency() {
    for ctx in [StoreCtx::sqlite().await, StoreCtx::postgres().await] {
        let store = &ctx.store;
        let n = 500u32;
        let started = std::time::Instant::now();
        for i in 0..n {
            let push = new_push(Some(&format!("biz-{i}")));
            admitted(store, push, Some(groupcast(1_000_000))).await;
        }
        let per = started.elapsed() / n;
        let started = std::time::Instant::now();
        for _ in 0..n {
            let id = admitted(store, new_push(None), Some(groupcast(1_000_000))).await;
            finish_ok(store, &id, failed()).await;
        }
        let pair = started.elapsed() / n;
        println!(
            "{}: admit {per:?}/op, admit+finish(refund) {pair:?}/pair",
            store.backend()
        );
    }
}

#[tokio::test]
async fn sqlite_in_memory_store_works() {
    let options = crate::helpers::test_pool_options();
    let Ok(store) = umeng_push_gateway::store::connect("sqlite::memory:", &options).await else {
        panic!("cannot open an in-memory database");
    };
    assert!(store.migrate().await.is_ok());

    let id = admitted(&store, new_push(Some("biz-1")), Some(groupcast(5))).await;

    assert_eq!(get(&store, &id).await.status, PushStatus::Pending);
    assert!(store.ready().await.is_ok());
}

#[tokio::test]
async fn a_sqlite_file_checkpoints_its_log_in_the_background() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("wal.db");
    let url = format!("sqlite://{}", path.display());
    let options = crate::helpers::test_pool_options();
    let store = umeng_push_gateway::store::connect(&url, &options)
        .await
        .expect("the database opens");
    store.migrate().await.expect("migrations apply");
    for i in 0..20 {
        admitted(&store, new_push(Some(&format!("biz-{i}"))), None).await;
    }

    // A commit leaves its pages in the log (it checkpoints only when the log is far
    // behind), so the database file holds every page only once the background checkpointer
    // has copied them: its length is then the database's page count times its page size.
    let mut reader = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("a second connection");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut logical, mut physical);
    loop {
        let pages: i64 = sqlx::query_scalar("pragma page_count")
            .fetch_one(&mut reader)
            .await
            .expect("page_count");
        let page_size: i64 = sqlx::query_scalar("pragma page_size")
            .fetch_one(&mut reader)
            .await
            .expect("page_size");
        logical = u64::try_from(pages * page_size).expect("a size");
        physical = std::fs::metadata(&path).expect("the database file").len();
        if logical == physical || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        physical, logical,
        "the log was not copied into the database file within 10 s"
    );
    assert!(logical > 4096, "the database has pages beyond its header");
}

#[tokio::test]
async fn ready_fails_before_migrations() {
    let dir = tempfile::tempdir().ok();
    let path = dir
        .as_ref()
        .map(|d| d.path().join("fresh.db"))
        .unwrap_or_default();
    let url = format!("sqlite://{}", path.display());
    let options = crate::helpers::test_pool_options();
    let Ok(store) = umeng_push_gateway::store::connect(&url, &options).await else {
        panic!("cannot open {url}");
    };

    let before = store.ready().await;
    let migrated = store.migrate().await;

    assert!(
        matches!(
            before,
            Err(umeng_push_gateway::store::StoreError::Migration(_))
        ),
        "{before:?}"
    );
    assert!(migrated.is_ok() && store.ready().await.is_ok());
}

async fn counts_by_hour_group_status_and_error_code_within_the_allowed_apps(ctx: StoreCtx) {
    // Arrange: two accepted and one failed push of app "shop", one accepted of app "other",
    // one pending of "shop"; and one "shop" push two days old.
    let store = &ctx.store;
    let since = db_now(store).await - time::Duration::hours(24);
    for _ in 0..2 {
        let id = admitted(store, new_push(None), None).await;
        assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);
    }
    let id = admitted(store, new_push(None), None).await;
    assert!(finish_ok(store, &id, failed()).await);
    let other = NewPush {
        app: "other".into(),
        ..new_push(None)
    };
    let id = admitted(store, other, None).await;
    assert!(finish_ok(store, &id, finish(PushStatus::Accepted, QuotaAction::Keep)).await);
    admitted(store, new_push(None), None).await;
    let old = admitted(store, new_push(None), None).await;
    ctx.db
        .execute(&match ctx.db {
            crate::helpers::TestDb::Sqlite(_) => {
                format!("update pushes set created_at = created_at - 172800000 where id = '{old}'")
            }
            crate::helpers::TestDb::Postgres(_) => format!(
                "update pushes set created_at = created_at - interval '2 days' where id = '{old}'"
            ),
        })
        .await;

    // Act
    let all = store
        .count_pushes_by_hour(since, None)
        .await
        .expect("counts");
    let shop_only = store
        .count_pushes_by_hour(since, Some(&["shop".to_string()]))
        .await
        .expect("counts for one app");

    // Assert: every row falls in an hour (a multiple of 3600) since `since`, and the sums
    // per (status, code) are exact; the old push and other apps are left out.
    let sum = |rows: &[umeng_push_gateway::store::HourlyCount], status, code: Option<&str>| {
        rows.iter()
            .filter(|r| r.status == status && r.error_code.as_deref() == code)
            .map(|r| r.count)
            .sum::<u64>()
    };
    for r in all.iter().chain(&shop_only) {
        assert_eq!(r.hour % 3600, 0, "{r:?}");
        assert!(r.hour + 3600 > since.unix_timestamp(), "{r:?}");
    }
    assert_eq!(sum(&all, PushStatus::Accepted, None), 3, "{all:?}");
    assert_eq!(sum(&all, PushStatus::Failed, Some("2003")), 1, "{all:?}");
    assert_eq!(sum(&all, PushStatus::Pending, None), 1, "{all:?}");
    assert_eq!(all.iter().map(|r| r.count).sum::<u64>(), 5, "{all:?}");
    assert_eq!(
        sum(&shop_only, PushStatus::Accepted, None),
        2,
        "{shop_only:?}"
    );
    assert_eq!(
        shop_only.iter().map(|r| r.count).sum::<u64>(),
        4,
        "{shop_only:?}"
    );
    let none = store
        .count_pushes_by_hour(since, Some(&[]))
        .await
        .expect("counts for no app");
    assert!(none.is_empty(), "{none:?}");
}

/// Outcomes written at the same moment (as a group commit of outcome records would gather
/// them): each is applied to its own push, refunds of one window add up, a repeated
/// outcome of one push applies once, and a saturation fills the window.
async fn concurrent_outcomes_keep_the_counts_exact(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(admitted(store, new_push(None), Some(groupcast(100))).await);
    }
    let q = groupcast(100);
    let used = || async {
        store
            .quota_state(APPKEY, q.kind, q.limit)
            .await
            .unwrap()
            .used
    };
    assert_eq!(used().await, 40);

    // 30 refunds and 10 kept, all at once; each refund twice (a duplicate finisher).
    let mut writes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let f = if i < 30 {
            failed()
        } else {
            finish(PushStatus::Accepted, QuotaAction::Keep)
        };
        let copies = if i < 30 { 2 } else { 1 };
        for _ in 0..copies {
            let store = Arc::clone(store);
            let (id, f) = (id.clone(), f.clone());
            writes.push(tokio::spawn(async move {
                store.finish(&id, f.into()).await.unwrap()
            }));
        }
    }
    let mut applied = 0;
    for w in writes {
        applied += usize::from(w.await.unwrap());
    }
    assert_eq!(applied, 40, "one write per push applies");
    assert_eq!(used().await, 10, "30 slots back, once each");
    for (i, id) in ids.iter().enumerate() {
        let want = if i < 30 {
            PushStatus::Failed
        } else {
            PushStatus::Accepted
        };
        assert_eq!(get(store, id).await.status, want);
    }

    // Two saturations at once fill the window, whatever it held.
    let a = admitted(store, new_push(None), Some(groupcast(100))).await;
    let b = admitted(store, new_push(None), Some(groupcast(100))).await;
    let sat = |id: String| {
        let store = Arc::clone(store);
        tokio::spawn(async move {
            store
                .finish(
                    &id,
                    finish(PushStatus::Failed, QuotaAction::Saturate(WindowUnit::Day)).into(),
                )
                .await
                .unwrap()
        })
    };
    let (x, y) = (sat(a), sat(b));
    assert!(x.await.unwrap() && y.await.unwrap());
    assert_eq!(used().await, 100);
}

/// Concurrent writes released together: `admissions` new pushes with keys `burst-<i>`,
/// except that admission `duplicate_of.0` reuses the id of push `duplicate_of.1` (so it
/// fails), and an outcome record for each push of `outcomes`.
struct Burst<'a> {
    admissions: u32,
    duplicate_of: (u32, &'a str),
    quota: fn(u32) -> Option<QuotaClaim>,
    outcomes: &'a [String],
    outcome: fn() -> Finish,
}

/// Runs a [`Burst`]; checks that the duplicate alone failed and that every outcome
/// applied, and returns the ids admitted.
async fn burst(store: &Arc<dyn Store>, burst: Burst<'_>) -> Vec<String> {
    let (duplicate, taken) = burst.duplicate_of;
    let writes = burst.admissions as usize + burst.outcomes.len();
    let barrier = Arc::new(tokio::sync::Barrier::new(writes + 1));
    let mut admissions = tokio::task::JoinSet::new();
    for i in 0..burst.admissions {
        let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
        let push = if i == duplicate {
            NewPush {
                id: taken.to_owned(),
                ..new_push(Some("duplicate-id"))
            }
        } else {
            new_push(Some(&format!("burst-{i}")))
        };
        let quota = (burst.quota)(i);
        admissions.spawn(async move {
            barrier.wait().await;
            (i, store.admit(push, quota).await)
        });
    }
    let mut outcomes = tokio::task::JoinSet::new();
    for id in burst.outcomes {
        let (store, barrier, id) = (Arc::clone(store), Arc::clone(&barrier), id.clone());
        let outcome = (burst.outcome)();
        outcomes.spawn(async move {
            barrier.wait().await;
            store.finish(&id, outcome.into()).await
        });
    }
    barrier.wait().await;

    let mut admitted_ids = Vec::new();
    for (i, result) in admissions.join_all().await {
        match result {
            Err(_) if i == duplicate => {}
            other if i == duplicate => panic!("a duplicate id was admitted: {other:?}"),
            Ok(Admission::Admitted { push_id, .. }) => admitted_ids.push(push_id),
            other => panic!("expected Admitted, got {other:?}"),
        }
    }
    for result in outcomes.join_all().await {
        assert!(matches!(result, Ok(true)), "{result:?}");
    }
    admitted_ids
}

/// Writes that arrive together share a transaction on both stores; one that fails (here a
/// duplicate push id) must fail alone: the others are written once each, and nothing of
/// the failed one (its key, its slot) remains.
async fn a_failing_write_in_a_burst_fails_alone(ctx: StoreCtx) {
    let store = &ctx.store;
    let taken = admitted(store, new_push(Some("first")), Some(groupcast(100))).await;
    let mut finished = Vec::new();
    for _ in 0..5 {
        finished.push(admitted(store, new_push(None), Some(groupcast(100))).await);
    }
    assert_eq!(used(store, 100).await, 6);

    let admitted_ids = burst(
        store,
        Burst {
            admissions: 34,
            duplicate_of: (17, &taken),
            quota: |_| Some(groupcast(100)),
            outcomes: &finished,
            outcome: failed,
        },
    )
    .await;
    assert_eq!(admitted_ids.len(), 33);
    // 6 before, 33 taken in the burst, 5 given back by the failed outcomes.
    assert_eq!(used(store, 100).await, 6 + 33 - 5);
    assert_eq!(list(store, all(100)).await.len(), 6 + 33, "each row once");
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys where out_biz_no = 'duplicate-id'")
            .await,
        0,
        "the failed admission left no key"
    );
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys")
            .await,
        34
    );
    for id in &finished {
        assert_eq!(get(store, id).await.status, PushStatus::Failed);
    }
    assert_eq!(
        get(store, &taken).await.out_biz_no.as_deref(),
        Some("first")
    );
}

/// Admissions and outcome records that keep their slot arrive together: on PostgreSQL they
/// share a statement, on SQLite a transaction. An admission that fails there (a duplicate
/// push id) must fail alone: the outcome records and the other admissions, with and
/// without a quota slot, are written once each.
async fn a_failing_admission_beside_outcome_records_fails_alone(ctx: StoreCtx) {
    let store = &ctx.store;
    let taken = admitted(store, new_push(Some("first")), None).await;
    let mut sent = Vec::new();
    for _ in 0..8 {
        sent.push(admitted(store, new_push(None), Some(groupcast(100))).await);
    }
    assert_eq!(used(store, 100).await, 8);

    let admitted_ids = burst(
        store,
        Burst {
            admissions: 32,
            duplicate_of: (11, &taken),
            // Every other admission takes a quota slot.
            quota: |i| (i % 2 == 0).then(|| groupcast(100)),
            outcomes: &sent,
            outcome: || finish(PushStatus::Accepted, QuotaAction::Keep),
        },
    )
    .await;
    assert_eq!(admitted_ids.len(), 31);
    assert_eq!(
        used(store, 100).await,
        8 + 16,
        "one slot per admission that took one"
    );
    assert_eq!(
        list(store, all(100)).await.len(),
        1 + 8 + 31,
        "each row once"
    );
    assert_eq!(
        ctx.db
            .query_i64("select count(*) from idempotency_keys where out_biz_no = 'duplicate-id'")
            .await,
        0,
        "the failed admission left no key"
    );
    for id in &sent {
        assert_eq!(get(store, id).await.status, PushStatus::Accepted);
    }
    for id in &admitted_ids {
        assert_eq!(get(store, id).await.status, PushStatus::Pending);
    }
}

/// `database.outcome_commit = "relaxed"` (migration 0015): the relaxed outcome function sets
/// `synchronous_commit = off` for its own transaction only; the next transaction on the same
/// connection waits for its flush again.
#[tokio::test]
async fn postgres_a_relaxed_outcome_commit_is_local_to_its_transaction() {
    use sqlx::{Connection, PgConnection};
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    let mut conn = PgConnection::connect(ctx.db.url()).await.unwrap();
    let setting = "select current_setting('synchronous_commit')";

    let mut tx = conn.begin().await.unwrap();
    let applied: Vec<String> =
        sqlx::query_scalar("select id from umgw_finish_batch_relaxed('[]'::jsonb) as id")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert!(applied.is_empty());
    let inside: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after: String = sqlx::query_scalar(setting)
        .fetch_one(&mut conn)
        .await
        .unwrap();

    assert_eq!(inside, "off", "the outcome's own transaction does not wait");
    assert_eq!(after, "on", "the connection's next transaction waits again");
}

/// A store with relaxed outcome commits records outcome-only batches through the relaxed
/// function (a lone outcome that keeps its slot goes as a plain statement instead, relaxed
/// too: the crash test below loses it) and keeps every effect of an outcome (its status, its
/// refund); a default store never calls it. Calls are counted by PostgreSQL
/// (`track_functions`).
#[tokio::test]
async fn postgres_relaxed_outcome_commits_record_outcomes_through_the_relaxed_function() {
    use umeng_push_gateway::config::OutcomeCommit;
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    let crate::helpers::TestDb::Postgres(pg) = &ctx.db else {
        unreachable!()
    };
    // Sessions opened from now on count their function calls.
    ctx.db
        .execute(&format!(
            "alter database {} set track_functions = 'pl'",
            pg.name()
        ))
        .await;
    let calls = |name: &'static str| {
        let db = &ctx.db;
        async move {
            db.query_i64(&format!(
                "select coalesce(sum(calls), 0)::bigint from pg_stat_user_functions \
                  where funcname = '{name}'"
            ))
            .await
        }
    };
    // A backend reports its counts within about a second of going idle.
    let wait_for_calls = |name: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = calls(name).await;
            if n > 0 || tokio::time::Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // Arrange, act: a default store records two outcomes: one that keeps its slot (a
    // lone one goes as a plain update) and a refund (through the durable function).
    let durable = ctx.db.connect_again().await;
    let id = admitted(&durable, new_push(None), Some(groupcast(5))).await;
    assert!(
        finish_ok(
            &durable,
            &id,
            finish(PushStatus::Accepted, QuotaAction::Keep)
        )
        .await
    );
    let id = admitted(&durable, new_push(None), Some(groupcast(5))).await;
    assert!(finish_ok(&durable, &id, failed()).await);

    // Assert: the durable function only.
    assert!(wait_for_calls("umgw_finish_batch").await > 0);
    assert_eq!(calls("umgw_finish_batch_relaxed").await, 0);

    // Arrange, act: a relaxed store records an acceptance and a refund.
    let relaxed = ctx
        .db
        .connect_with(&PoolOptions {
            outcome_commit: OutcomeCommit::Relaxed,
            ..crate::helpers::test_pool_options()
        })
        .await;
    let kept = admitted(&relaxed, new_push(None), Some(groupcast(5))).await;
    let refunded = admitted(&relaxed, new_push(None), Some(groupcast(5))).await;
    assert_eq!(used(&relaxed, 5).await, 3);
    assert!(
        finish_ok(
            &relaxed,
            &kept,
            finish(PushStatus::Accepted, QuotaAction::Keep)
        )
        .await
    );
    assert!(finish_ok(&relaxed, &refunded, failed()).await);
    assert!(
        !finish_ok(&relaxed, &refunded, failed()).await,
        "a second outcome for a final push changes nothing"
    );

    // Assert: each outcome applied as with durable commits, through the relaxed function.
    let kept = get(&relaxed, &kept).await;
    assert_eq!(kept.status, PushStatus::Accepted);
    assert_eq!(kept.task_id.as_deref(), Some("t-1"));
    let refunded = get(&relaxed, &refunded).await;
    assert_eq!(refunded.status, PushStatus::Failed);
    assert!(refunded.quota_refunded);
    assert_eq!(
        used(&relaxed, 5).await,
        2,
        "the refund gave its slot back once"
    );
    assert!(wait_for_calls("umgw_finish_batch_relaxed").await > 0);
}

/// What `database.outcome_commit` trades, on a PostgreSQL server of the test's own that
/// crashes: its WAL writer is stopped (so nothing but a commit that waits flushes the WAL),
/// an outcome is recorded, then the WAL writer is killed, which makes the server drop its
/// shared memory and recover from the WAL on disk.
///
/// - A durable outcome survives.
/// - A relaxed one is lost, but its push is not: the admission waited for its flush. The
///   push is `pending` again, the sweeper marks it `unknown`, and the real outcome,
///   recorded once more, replaces that guess (as when a replica dies mid-send).
/// - A relaxed outcome followed by any commit that waits (here an admission) survives, as
///   that commit flushes the WAL up to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_crash_loses_only_relaxed_outcomes_that_no_later_commit_flushed() {
    use umeng_push_gateway::config::OutcomeCommit;
    if crate::helpers::skip_postgres() {
        return;
    }
    let server = crate::helpers::PrivateCluster::start(&["autovacuum=off", "wal_writer_delay=10s"]);
    let options = |outcome_commit| PoolOptions {
        outcome_commit,
        ..crate::helpers::test_pool_options()
    };
    let open = |outcome_commit| {
        let url = server.url();
        async move {
            match umeng_push_gateway::store::connect(&url, &options(outcome_commit)).await {
                Ok(s) => s,
                Err(e) => panic!("cannot open the private server: {e}"),
            }
        }
    };
    open(OutcomeCommit::Durable).await.migrate().await.unwrap();
    let accepted = || finish(PushStatus::Accepted, QuotaAction::Keep);

    // Records the outcome of `id` with the WAL writer stopped, runs `then`, and crashes
    // the server.
    let crash_after = |store: Arc<dyn Store>, id: String, then: Option<NewPush>| {
        let server = &server;
        async move {
            let walwriter = server.pid_of("walwriter").await;
            signal(walwriter, "STOP");
            assert!(finish_ok(&store, &id, accepted()).await);
            let then = match then {
                Some(push) => Some(admitted(&store, push, None).await),
                None => None,
            };
            signal(walwriter, "KILL");
            drop(store);
            server.wait_ready().await;
            then
        }
    };

    // A durable outcome survives.
    let durable = open(OutcomeCommit::Durable).await;
    let id = admitted(&durable, new_push(None), Some(groupcast(5))).await;
    crash_after(durable, id.clone(), None).await;
    let store = open(OutcomeCommit::Durable).await;
    assert_eq!(get(&store, &id).await.status, PushStatus::Accepted);

    // A relaxed outcome alone is lost; its push is pending again.
    let relaxed = open(OutcomeCommit::Relaxed).await;
    let lost = admitted(&relaxed, new_push(None), Some(groupcast(5))).await;
    crash_after(relaxed, lost.clone(), None).await;
    let store = open(OutcomeCommit::Relaxed).await;
    let r = get(&store, &lost).await;
    assert_eq!(r.status, PushStatus::Pending, "the outcome was not flushed");
    assert_eq!(r.task_id, None);
    assert_eq!(used(&store, 5).await, 2, "both admissions kept their slot");
    // The sweeper's guess, then the real outcome when it is recorded again.
    assert_eq!(store.sweep_stale_pending(0).await.ok(), Some(1));
    assert_eq!(get(&store, &lost).await.status, PushStatus::Unknown);
    assert!(finish_ok(&store, &lost, accepted()).await);
    assert_eq!(get(&store, &lost).await.status, PushStatus::Accepted);

    // A relaxed outcome followed by an admission survives with it.
    let id = admitted(&store, new_push(None), Some(groupcast(5))).await;
    let next = crash_after(store, id.clone(), Some(new_push(None))).await;
    let store = open(OutcomeCommit::Relaxed).await;
    assert_eq!(get(&store, &id).await.status, PushStatus::Accepted);
    let next = next.expect("admitted after the outcome");
    assert_eq!(get(&store, &next).await.status, PushStatus::Pending);
}

/// Sends `kill -<name>` to a process.
fn signal(pid: i32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Admissions with nothing to check or count, and outcome records that keep their slot,
/// released together so that they share batches (PostgreSQL writes each kind in one
/// statement): every job still gets its own answer. Two outcomes for one push apply once,
/// an outcome for a final push or one fenced by a claim it does not hold applies not at
/// all, and a duplicate push id fails alone.
async fn plain_admissions_and_kept_outcomes_released_together_answer_each(ctx: StoreCtx) {
    let store = &ctx.store;
    // Arrange: pushes waiting for their outcome, and one already final.
    let mut open = Vec::new();
    for _ in 0..6 {
        open.push(admitted(store, unicast(None), None).await);
    }
    let closed = admitted(store, unicast(None), None).await;
    assert!(finish_ok(store, &closed, failed()).await);
    let accepted = || finish(PushStatus::Accepted, QuotaAction::Keep);
    let fenced = Finish {
        claim: Some(7),
        ..accepted()
    };
    let mut outcomes = vec![
        (open[0].clone(), accepted()),
        (open[0].clone(), accepted()),
        (closed.clone(), accepted()),
        (open[5].clone(), fenced),
    ];
    outcomes.extend(open[1..5].iter().map(|id| (id.clone(), accepted())));

    // Act: 12 admissions and 8 outcome records at once, then 6 admissions of which one
    // reuses an id.
    let (admitted_first, answers) = together(store, 12, None, outcomes).await;
    let (admitted_second, _) = together(store, 6, Some(&open[2]), Vec::new()).await;

    // Assert
    assert_eq!(admitted_first.len(), 12);
    assert_eq!(admitted_second.len(), 5, "the duplicate alone failed");
    let applied = |id: &str| {
        answers
            .iter()
            .filter(|(i, a)| i == id && matches!(a, Ok(true)))
            .count()
    };
    assert!(answers.iter().all(|(_, a)| a.is_ok()), "{answers:?}");
    assert_eq!(
        applied(&open[0]),
        1,
        "two outcomes for one push: one applies"
    );
    assert_eq!(applied(&closed), 0, "a final push keeps its outcome");
    assert_eq!(applied(&open[5]), 0, "fenced by a claim it does not hold");
    for id in &open[..5] {
        let r = get(store, id).await;
        assert_eq!(r.status, PushStatus::Accepted);
        assert_eq!(r.task_id.as_deref(), Some("t-1"));
        assert_eq!(r.attempts.len(), 1);
    }
    assert_eq!(get(store, &open[5]).await.status, PushStatus::Pending);
    let closed = get(store, &closed).await;
    assert_eq!(closed.status, PushStatus::Failed);
    assert_eq!(closed.error_code.as_deref(), Some("2003"));
    for id in admitted_first.iter().chain(&admitted_second) {
        let r = get(store, id).await;
        assert_eq!(r.status, PushStatus::Pending);
        assert_eq!(r.cast_type, "unicast");
        assert_eq!(r.request["type"], "groupcast", "the request as given");
    }
    assert_eq!(
        list(store, all(100)).await.len(),
        7 + 12 + 5,
        "each row once"
    );
}

/// `admissions` plain unicast admissions (the one at index 3 reusing `duplicate`'s id,
/// when given) and the `outcomes`, released at once; the ids admitted, and each outcome's
/// push and answer.
async fn together(
    store: &Arc<dyn Store>,
    admissions: usize,
    duplicate: Option<&str>,
    outcomes: Vec<(String, Finish)>,
) -> (Vec<String>, Vec<(String, Result<bool, String>)>) {
    let barrier = Arc::new(tokio::sync::Barrier::new(admissions + outcomes.len() + 1));
    let mut admits = tokio::task::JoinSet::new();
    for i in 0..admissions {
        let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
        let push = match duplicate {
            Some(id) if i == 3 => NewPush {
                id: id.to_owned(),
                ..unicast(None)
            },
            _ => unicast(None),
        };
        admits.spawn(async move {
            barrier.wait().await;
            store.admit(push, None).await
        });
    }
    let mut finishes = tokio::task::JoinSet::new();
    for (id, outcome) in outcomes {
        let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
        finishes.spawn(async move {
            barrier.wait().await;
            let answer = store.finish(&id, outcome.into()).await;
            (id, answer.map_err(|e| e.to_string()))
        });
    }
    barrier.wait().await;
    let mut ids = Vec::new();
    for result in admits.join_all().await {
        match result {
            Ok(Admission::Admitted { push_id, .. }) => ids.push(push_id),
            Err(_) if duplicate.is_some() => {}
            other => panic!("expected Admitted, got {other:?}"),
        }
    }
    (ids, finishes.join_all().await)
}

/// A lone admission without quota (with a new key or none), and a lone outcome record that
/// keeps its slot, skip the functions on PostgreSQL (plain prepared statements). The rows
/// they write equal those the batch functions write for the same push: for a synchronous
/// push, one with a key, one due at once and one held until `send_at`, and for outcomes with
/// and without bodies.
#[tokio::test]
async fn postgres_lone_plain_writes_match_the_batch_functions() {
    use sqlx::{Connection, PgConnection};
    use umeng_push_gateway::store::AsyncDelivery;
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    let store = &ctx.store;
    let mut conn = PgConnection::connect(ctx.db.url()).await.unwrap();
    // A row as written, without its id, its key and its clock-set times; with its key's row.
    let row = "select to_jsonb(p) \
         - '{id,out_biz_no,created_at,updated_at,finished_at,next_attempt_at}'::text[] \
         || jsonb_build_object('due_now', p.next_attempt_at is not null \
                                          and p.next_attempt_at is distinct from p.send_at, \
                               'finished', p.finished_at is not null, \
                               'keyed', p.out_biz_no is not null, \
                               'key', (select to_jsonb(k) - '{out_biz_no,push_id,created_at}'::text[] \
                                         from idempotency_keys k \
                                        where k.push_id = p.id and k.out_biz_no = p.out_biz_no)) \
         from pushes p where p.id = $1";
    let send_at = OffsetDateTime::from_unix_timestamp(4_000_000_000).unwrap();
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let delivery = |hold: bool| AsyncDelivery {
        outbox: json!({"body": {"type": "unicast", "device_tokens": "t"}}),
        hold,
        deliver_by: send_at + time::Duration::hours(1),
        quota_wait: false,
        defer_quota: false,
    };
    // The synchronous pushes first, one for each outcome.
    let pushes = [
        unicast(None),
        unicast(Some("lone-key")),
        unicast(None),
        NewPush {
            description: None,
            ..unicast(None)
        },
        NewPush {
            delivery: Some(delivery(false)),
            description: None,
            ..unicast(None)
        },
        NewPush {
            delivery: Some(delivery(true)),
            send_at: Some(send_at),
            ..unicast(None)
        },
    ];
    let outcomes = [
        Finish {
            msg_id: Some("m-1".into()),
            sent_at: Some(send_at),
            ..finish(PushStatus::Accepted, QuotaAction::Keep)
        },
        finish(PushStatus::Unknown, QuotaAction::Keep),
        Finish {
            umeng_request: None,
            umeng_response: None,
            latency_ms: None,
            attempts: Vec::new(),
            error_code: Some("not_sent".into()),
            error_msg: Some("nothing reached Umeng".into()),
            http_status: 502,
            ..finish(PushStatus::Failed, QuotaAction::Keep)
        },
        // Umeng's FAIL for a push without quota.
        Finish {
            quota: QuotaAction::Keep,
            ..failed()
        },
    ];

    for (i, push) in pushes.into_iter().enumerate() {
        // Act: one push through the store, alone; its twin through the batch functions.
        let alone = admitted(store, push.clone(), None).await;
        let twin = NewPush {
            id: uuid::Uuid::now_v7().to_string(),
            out_biz_no: push.out_biz_no.as_ref().map(|k| format!("{k}-twin")),
            ..push.clone()
        };
        let d = twin.delivery.as_ref();
        let admit_row = json!([{
            "id": twin.id, "app": twin.app, "appkey": twin.appkey, "platform": twin.platform,
            "cast_type": twin.cast_type, "task_class": twin.task_class,
            "production_mode": twin.production_mode, "client": twin.client,
            "out_biz_no": twin.out_biz_no, "fingerprint": twin.fingerprint, "request": twin.request,
            "description": twin.description, "quota_kind": null, "quota_limit": null,
            "quota_unit": null,
            "status": d.map_or(PushStatus::Pending, |d| d.status()).as_str(),
            "defer_quota": false, "outbox": d.map(|d| &d.outbox),
            "send_at": twin.send_at.map(rfc3339),
            "deliver_by": d.map(|d| rfc3339(d.deliver_by)),
            "quota_wait": false,
        }]);
        let answered: String = sqlx::query_scalar("select outcome from umgw_admit_batch($1)")
            .bind(&admit_row)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(answered, "admitted");
        let (before_alone, before_twin) = (
            row_json(&mut conn, row, &alone).await,
            row_json(&mut conn, row, &twin.id).await,
        );
        assert_eq!(before_alone, before_twin, "admitted alike");
        assert_eq!(
            before_alone["key"].is_object(),
            push.out_biz_no.is_some(),
            "a key is claimed with its push"
        );

        // An asynchronous push's outcome comes from a claim.
        let Some(outcome) = outcomes.get(i) else {
            assert!(push.delivery.is_some());
            continue;
        };
        assert!(finish_ok(store, &alone, outcome.clone()).await);
        let finish_row = json!([{
            "id": twin.id, "status": outcome.status.as_str(),
            "umeng_request": outcome.umeng_request.as_ref()
                .map(|b| serde_json::from_str::<serde_json::Value>(b.get()).unwrap()),
            "umeng_response": outcome.umeng_response, "msg_id": outcome.msg_id,
            "task_id": outcome.task_id, "file_id": outcome.file_id,
            "error_code": outcome.error_code, "error_msg": outcome.error_msg,
            "http_status": outcome.http_status, "latency_ms": outcome.latency_ms,
            "sent_at": outcome.sent_at.map(rfc3339),
            "action": "keep", "unit": 60, "attempts": outcome.attempts, "claim": null,
        }]);
        let applied: Vec<String> = sqlx::query_scalar("select id from umgw_finish_batch($1) as id")
            .bind(&finish_row)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(applied, vec![twin.id.clone()]);
        let (after_alone, after_twin) = (
            row_json(&mut conn, row, &alone).await,
            row_json(&mut conn, row, &twin.id).await,
        );
        assert_eq!(after_alone, after_twin, "finished alike");
        assert_ne!(after_alone, before_alone, "the outcome was recorded");
    }
}

async fn row_json(conn: &mut sqlx::PgConnection, sql: &str, id: &str) -> serde_json::Value {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap()
}
