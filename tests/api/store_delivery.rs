//! The store contract of asynchronous delivery: claims with leases and fencing, deferred
//! quota slots (first come, first served), retries, recovery of lapsed leases, local
//! cancel, deadlines and the queue statistics. Every case runs against SQLite and
//! PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use umeng_push_gateway::quota::{QuotaKind, QuotaLimit, WindowUnit};
use umeng_push_gateway::store::{
    Admission, AsyncDelivery, Attempt, DeliveryApp, DeliveryClaim, DeliveryMode, DeliveryRetry,
    Finish, NewPush, PushQuery, PushStatus, QuotaAction, QuotaClaim, Store,
};

use crate::helpers::StoreCtx;

crate::store_cases!(
    a_claim_leases_a_push_once_and_a_lapsed_unicast_becomes_unknown,
    a_lapsed_task_class_push_is_due_again_and_the_old_claim_is_fenced,
    deferred_slots_are_taken_at_the_claim_first_come_first_served,
    a_held_reject_push_fails_when_its_window_is_full,
    a_retry_gives_the_slot_back_and_the_next_claim_takes_one,
    withdraw_cancels_only_waiting_pushes_and_gives_the_slot_back,
    a_push_past_its_deadline_fails_at_the_claim,
    pushes_a_claim_cannot_take_do_not_keep_it_from_the_next,
    the_per_app_limit_caps_a_claim,
    a_claim_takes_the_oldest_due_across_apps_within_each_limit,
    queue_stats_count_each_state,
    held_pushes_are_not_due_before_send_at,
    waiting_for_quota_ends_at_the_deadline,
    history_lists_a_retried_push_with_its_attempts_and_next_try,
    a_claim_from_a_due_time_leaves_earlier_pushes_to_a_whole_read,
);

const APPKEY: &str = "appkey-d";

fn apps(limit: u32) -> Vec<DeliveryApp> {
    vec![DeliveryApp {
        app: "shop".into(),
        appkey: APPKEY.into(),
        limit,
        due_from: None,
    }]
}

/// A second app, with its own appkey.
fn other_app(limit: u32) -> DeliveryApp {
    DeliveryApp {
        app: "other".into(),
        appkey: "other-key".into(),
        limit,
        due_from: None,
    }
}

fn groupcast_quota(limit: u32) -> QuotaClaim {
    QuotaClaim {
        kind: QuotaKind::Groupcast,
        limit: QuotaLimit {
            limit,
            window: WindowUnit::Day,
        },
    }
}

fn delivery(hold: bool, quota_wait: bool, defer_quota: bool) -> AsyncDelivery {
    AsyncDelivery {
        outbox: json!({"body": {"type": "groupcast"}}),
        hold,
        deliver_by: OffsetDateTime::now_utc() + time::Duration::hours(1),
        quota_wait,
        defer_quota,
    }
}

fn push(task_class: bool, d: AsyncDelivery) -> NewPush {
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: APPKEY.into(),
        platform: "android".into(),
        cast_type: if task_class { "groupcast" } else { "unicast" }.into(),
        task_class,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: None,
        fingerprint: "fp".into(),
        request: json!({"type": "groupcast"}),
        description: None,
        send_at: None,
        delivery: Some(d),
    }
}

async fn admit(store: &Arc<dyn Store>, p: NewPush, quota: Option<QuotaClaim>) -> String {
    match store.admit(p, quota).await.expect("admit") {
        Admission::Admitted { push_id, .. } => push_id,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

async fn claim(store: &Arc<dyn Store>, limit: u32, lease_ms: u64) -> Vec<DeliveryClaim> {
    store
        .claim_deliveries(limit, Duration::from_millis(lease_ms), &apps(10))
        .await
        .expect("claim")
}

async fn status(store: &Arc<dyn Store>, id: &str) -> PushStatus {
    store.get_push(id).await.unwrap().unwrap().status
}

async fn used(store: &Arc<dyn Store>, limit: u32) -> u32 {
    let q = groupcast_quota(limit);
    store
        .quota_state(APPKEY, q.kind, q.limit)
        .await
        .expect("quota state")
        .used
}

fn accepted(claim: &DeliveryClaim) -> Finish {
    Finish {
        status: PushStatus::Accepted,
        umeng_request: None,
        umeng_response: Some(json!({"ret": "SUCCESS"})),
        msg_id: Some("m".into()),
        task_id: None,
        file_id: None,
        error_code: None,
        error_msg: None,
        http_status: 201,
        latency_ms: Some(1),
        sent_at: Some(OffsetDateTime::now_utc()),
        quota: QuotaAction::Keep,
        attempts: Vec::new(),
        claim: Some(claim.claim),
    }
}

async fn a_claim_leases_a_push_once_and_a_lapsed_unicast_becomes_unknown(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admit(store, push(false, delivery(false, false, false)), None).await;
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::AwaitingSend);
    assert!(record.next_attempt_at.is_some());

    let claims = claim(store, 10, 100).await;
    assert_eq!(claims.len(), 1);
    assert_eq!(
        (claims[0].claim, claims[0].outbox["body"]["type"].as_str()),
        (1, Some("groupcast"))
    );
    assert_eq!(status(store, &id).await, PushStatus::Pending);
    assert!(
        claim(store, 10, 100).await.is_empty(),
        "leased: nobody else gets it"
    );
    // The synchronous sweeper leaves a leased push alone, however old.
    assert_eq!(store.sweep_stale_pending(0).await.unwrap(), 0);

    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.recover_deliveries().await.unwrap(), 1);
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref()),
        (PushStatus::Unknown, Some("stale_pending"))
    );
    assert!(
        claim(store, 10, 100).await.is_empty(),
        "a unicast is never sent again"
    );
    // The worker's late real answer replaces the guess.
    assert!(store
        .finish(&id, accepted(&claims[0]).into())
        .await
        .unwrap());
    assert_eq!(status(store, &id).await, PushStatus::Accepted);
}

async fn a_lapsed_task_class_push_is_due_again_and_the_old_claim_is_fenced(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admit(store, push(true, delivery(false, false, false)), None).await;
    let first = claim(store, 10, 50).await.remove(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.recover_deliveries().await.unwrap(), 1);
    assert_eq!(status(store, &id).await, PushStatus::AwaitingSend);
    let second = claim(store, 10, 60_000).await.remove(0);
    assert_eq!(second.claim, 2);
    // The first worker's late writes are refused; the second's apply.
    assert!(!store.finish(&id, accepted(&first).into()).await.unwrap());
    let retry = DeliveryRetry {
        status: PushStatus::AwaitingSend,
        delay: Duration::ZERO,
        error_code: Some("not_sent".into()),
        error_msg: None,
        umeng_response: None,
        attempts: Vec::new(),
        refund: true,
    };
    assert!(!store.retry_delivery(&first, retry).await.unwrap());
    assert!(store.finish(&id, accepted(&second).into()).await.unwrap());
    assert_eq!(status(store, &id).await, PushStatus::Accepted);
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert!(r.next_attempt_at.is_none(), "a final push is not due");
}

async fn deferred_slots_are_taken_at_the_claim_first_come_first_served(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let p = push(true, delivery(false, true, true));
        ids.push(admit(store, p, Some(groupcast_quota(2))).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(used(store, 2).await, 0, "no slot at admission");
    let claims = claim(store, 10, 60_000).await;
    let claimed: Vec<&str> = claims.iter().map(|c| c.push_id.as_str()).collect();
    assert_eq!(
        claimed,
        [ids[0].as_str(), ids[1].as_str()],
        "the oldest first"
    );
    assert_eq!(used(store, 2).await, 2);
    let waiting = store.get_push(&ids[2]).await.unwrap().unwrap();
    assert_eq!(waiting.status, PushStatus::AwaitingQuota);
    let next = waiting.next_attempt_at.expect("due when the window ends");
    assert!(
        next > OffsetDateTime::now_utc() + time::Duration::minutes(1),
        "{next}"
    );

    // A slot given back goes to the oldest waiter, not to a newer push.
    let newer = admit(
        store,
        push(true, delivery(false, true, true)),
        Some(groupcast_quota(2)),
    )
    .await;
    let retry = DeliveryRetry {
        status: PushStatus::AwaitingSend,
        delay: Duration::from_secs(3600),
        error_code: None,
        error_msg: None,
        umeng_response: None,
        attempts: Vec::new(),
        refund: true,
    };
    assert!(store.retry_delivery(&claims[0], retry).await.unwrap());
    assert_eq!(used(store, 2).await, 1);
    assert!(
        claim(store, 10, 60_000).await.is_empty(),
        "the newer push queues behind"
    );
    assert_eq!(status(store, &newer).await, PushStatus::AwaitingQuota);
    assert_eq!(used(store, 2).await, 1);
}

async fn a_held_reject_push_fails_when_its_window_is_full(ctx: StoreCtx) {
    let store = &ctx.store;
    // The window is full already (a synchronous push took the only slot).
    let mut sync = push(true, delivery(false, false, false));
    sync.delivery = None;
    admit(store, sync, Some(groupcast_quota(1))).await;
    let id = admit(
        store,
        push(true, delivery(false, false, true)),
        Some(groupcast_quota(1)),
    )
    .await;
    assert!(claim(store, 10, 60_000).await.is_empty());
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref(), r.http_status),
        (PushStatus::Failed, Some("quota_exhausted"), Some(429))
    );
    assert_eq!(used(store, 1).await, 1);
}

async fn a_retry_gives_the_slot_back_and_the_next_claim_takes_one(ctx: StoreCtx) {
    let store = &ctx.store;
    // "reject", due now: the slot is taken at admission.
    let id = admit(
        store,
        push(true, delivery(false, false, false)),
        Some(groupcast_quota(5)),
    )
    .await;
    assert_eq!(used(store, 5).await, 1);
    let c = claim(store, 10, 60_000).await.remove(0);
    assert_eq!(
        used(store, 5).await,
        1,
        "the claim keeps the admission's slot"
    );
    let retry = DeliveryRetry {
        status: PushStatus::AwaitingSend,
        delay: Duration::ZERO,
        error_code: Some("not_sent".into()),
        error_msg: Some("refused".into()),
        umeng_response: None,
        attempts: Vec::new(),
        refund: true,
    };
    assert!(store.retry_delivery(&c, retry.clone()).await.unwrap());
    assert_eq!(
        used(store, 5).await,
        0,
        "nothing was sent: the slot goes back"
    );
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref()),
        (PushStatus::AwaitingSend, Some("not_sent"))
    );
    let again = claim(store, 10, 60_000).await.remove(0);
    assert_eq!(again.claim, 2);
    assert_eq!(
        used(store, 5).await,
        1,
        "the next attempt takes a slot of its own"
    );
    // A retry that keeps the slot (Umeng may have the task) does not give it back.
    let keep = DeliveryRetry {
        refund: false,
        ..retry
    };
    assert!(store.retry_delivery(&again, keep).await.unwrap());
    assert_eq!(used(store, 5).await, 1);
    claim(store, 10, 60_000).await.remove(0);
    assert_eq!(used(store, 5).await, 1, "a held slot is not taken twice");
}

async fn withdraw_cancels_only_waiting_pushes_and_gives_the_slot_back(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admit(
        store,
        push(true, delivery(false, false, false)),
        Some(groupcast_quota(5)),
    )
    .await;
    assert_eq!(used(store, 5).await, 1);
    assert!(store.withdraw(&id).await.unwrap());
    assert_eq!(status(store, &id).await, PushStatus::Withdrawn);
    assert_eq!(used(store, 5).await, 0);
    assert!(!store.withdraw(&id).await.unwrap(), "once");
    assert_eq!(used(store, 5).await, 0);
    assert!(claim(store, 10, 60_000).await.is_empty());

    let sending = admit(store, push(true, delivery(false, false, false)), None).await;
    claim(store, 10, 60_000).await;
    assert!(
        !store.withdraw(&sending).await.unwrap(),
        "a push being sent is not withdrawn"
    );
    assert_eq!(status(store, &sending).await, PushStatus::Pending);
}

async fn a_push_past_its_deadline_fails_at_the_claim(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut d = delivery(false, false, false);
    d.deliver_by = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let id = admit(store, push(true, d), Some(groupcast_quota(5))).await;
    assert_eq!(used(store, 5).await, 1);
    assert!(claim(store, 10, 60_000).await.is_empty());
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref()),
        (PushStatus::Failed, Some("delivery_expired"))
    );
    assert_eq!(used(store, 5).await, 0, "its slot goes back");
}

/// A claim for one free slot whose first push is past its deadline, with more such
/// pushes and a full quota window behind it, still reaches a push it can send (on
/// PostgreSQL, in a second pass that starts where the first stopped), and fails on its way
/// every expired push it read.
async fn pushes_a_claim_cannot_take_do_not_keep_it_from_the_next(ctx: StoreCtx) {
    // Arrange: two expired pushes, one that finds its window full, then one without a quota.
    let store = &ctx.store;
    let mut expired = Vec::new();
    for _ in 0..2 {
        let mut d = delivery(false, false, false);
        d.deliver_by = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        expired.push(admit(store, push(false, d), None).await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let taker = admit(
        store,
        push(true, delivery(false, false, true)),
        Some(groupcast_quota(1)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let full = admit(
        store,
        push(true, delivery(false, false, true)),
        Some(groupcast_quota(1)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let fresh = admit(store, push(false, delivery(false, false, false)), None).await;
    let one_slot = apps(1);
    let one = |limit| store.claim_deliveries(limit, Duration::from_secs(60), &one_slot);
    let ids = |claims: Vec<DeliveryClaim>| -> Vec<String> {
        claims.into_iter().map(|c| c.push_id).collect()
    };

    // Act: a claim of one takes the groupcast that finds its slot; the next, the unicast.
    let first = ids(one(1).await.expect("claim"));
    let second = ids(one(1).await.expect("claim"));

    // Assert
    assert_eq!(first, [taker]);
    assert_eq!(second, [fresh], "the full window's push is not taken");
    for id in &expired {
        let r = store.get_push(id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.error_code.as_deref()),
            (PushStatus::Failed, Some("delivery_expired"))
        );
    }
    let r = store.get_push(&full).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref()),
        (PushStatus::Failed, Some("quota_exhausted")),
        "a push that may not wait fails when its window is full"
    );
    assert_eq!(used(store, 1).await, 1);
}

/// The delivery claim keeps its PostgreSQL connection from one claim that took pushes to
/// the next. When the server ends that session (a restart, a failover), one claim may fail;
/// the next runs on a fresh connection and takes what is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_after_its_session_ended_reconnects() {
    if crate::helpers::skip_postgres() {
        return;
    }
    let (store, db) = crate::helpers::postgres_store().await;
    let store = &store;
    let first = admit(store, push(false, delivery(false, false, false)), None).await;
    let second = admit(store, push(false, delivery(false, false, false)), None).await;
    let took: Vec<String> = claim(store, 1, 60_000)
        .await
        .into_iter()
        .map(|c| c.push_id)
        .collect();
    assert_eq!(took, [first]);

    db.drop_sessions().await;
    let mut failed = 0;
    let claimed = loop {
        match store
            .claim_deliveries(1, Duration::from_secs(60), &apps(10))
            .await
        {
            Ok(claimed) => break claimed,
            Err(_) if failed == 0 => failed += 1,
            Err(e) => panic!("a second claim failed too: {e}"),
        }
    };

    let took: Vec<String> = claimed.into_iter().map(|c| c.push_id).collect();
    assert_eq!(
        took,
        [second],
        "the push due is taken once the claim reconnects"
    );
}

async fn the_per_app_limit_caps_a_claim(ctx: StoreCtx) {
    let store = &ctx.store;
    for _ in 0..5 {
        admit(store, push(false, delivery(false, false, false)), None).await;
    }
    let two = store
        .claim_deliveries(10, Duration::from_secs(60), &apps(2))
        .await
        .unwrap();
    assert_eq!(two.len(), 2);
    let none = store
        .claim_deliveries(10, Duration::from_secs(60), &[other_app(10)])
        .await
        .unwrap();
    assert!(none.is_empty(), "only the listed apps' pushes are claimed");
    assert_eq!(
        claim(store, 1, 60_000).await.len(),
        1,
        "the global limit too"
    );
}

/// Each app's queue is read on its own (its index, its limit), and the claim takes what they
/// give oldest due first, as one scan of every app's queue would.
async fn a_claim_takes_the_oldest_due_across_apps_within_each_limit(ctx: StoreCtx) {
    // Arrange: shop and other alternate, oldest first; shop may send one more, other three.
    let store = &ctx.store;
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut p = push(false, delivery(false, false, false));
        if i % 2 == 1 {
            p.app = "other".into();
            p.appkey = "other-key".into();
        }
        ids.push(p.id.clone());
        admit(store, p, None).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut both = apps(1);
    both.push(other_app(3));

    // Act
    let claimed = store
        .claim_deliveries(4, Duration::from_secs(60), &both)
        .await
        .unwrap();

    // Assert: shop's oldest, then other's three, in due order.
    let got: Vec<&str> = claimed.iter().map(|c| c.push_id.as_str()).collect();
    assert_eq!(got, [&ids[0], &ids[1], &ids[3], &ids[5]]);
}

/// A claim given `due_from` reads the app's queue from that due time: a push due earlier
/// (here, one the claims before did not see) waits for a claim that reads the whole queue.
/// Each claimed push carries its due time, from which the worker sets the next floor.
async fn a_claim_from_a_due_time_leaves_earlier_pushes_to_a_whole_read(ctx: StoreCtx) {
    // Arrange: three pushes due one after another.
    let store = &ctx.store;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(admit(store, push(false, delivery(false, false, false)), None).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first = claim(store, 1, 60_000).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].push_id, ids[0]);
    let due = store
        .get_push(&ids[1])
        .await
        .unwrap()
        .unwrap()
        .next_attempt_at;
    assert!(
        first[0].due_at <= due.expect("due"),
        "due_at is the claimed push's due time"
    );

    // Act: a claim from just after the second push's due time.
    let mut from = apps(10);
    from[0].due_from = Some(due.unwrap() + time::Duration::milliseconds(1));
    let floored = store
        .claim_deliveries(10, Duration::from_secs(60), &from)
        .await
        .unwrap();
    let whole = claim(store, 10, 60_000).await;

    // Assert: the third push only; the second waited for the whole read.
    let got: Vec<&str> = floored.iter().map(|c| c.push_id.as_str()).collect();
    assert_eq!(got, [&ids[2]]);
    assert!(floored[0].due_at > due.unwrap());
    let got: Vec<&str> = whole.iter().map(|c| c.push_id.as_str()).collect();
    assert_eq!(got, [&ids[1]]);
}

async fn queue_stats_count_each_state(ctx: StoreCtx) {
    let store = &ctx.store;
    admit(store, push(false, delivery(false, false, false)), None).await;
    admit(store, push(false, delivery(false, false, false)), None).await;
    let mut held = push(false, delivery(true, false, false));
    held.send_at = Some(OffsetDateTime::now_utc() + time::Duration::hours(1));
    admit(store, held, None).await;
    claim(store, 1, 60_000).await;
    let stats = store.queue_stats().await.unwrap();
    let count = |s: PushStatus| {
        stats
            .iter()
            .filter(|q| q.app == "shop" && q.status == s)
            .map(|q| q.count)
            .sum::<u64>()
    };
    assert_eq!(count(PushStatus::AwaitingSend), 1);
    assert_eq!(count(PushStatus::AwaitingSendAt), 1);
    assert_eq!(count(PushStatus::Pending), 1);
    let due = stats
        .iter()
        .find(|q| q.status == PushStatus::AwaitingSend)
        .and_then(|q| q.oldest_due);
    assert!(due.is_some(), "{stats:?}");
    let held_due = stats
        .iter()
        .find(|q| q.status == PushStatus::AwaitingSendAt)
        .and_then(|q| q.oldest_due);
    assert!(held_due.is_none(), "not due yet");
}

async fn held_pushes_are_not_due_before_send_at(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut held = push(false, delivery(true, false, false));
    let at = OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
    held.send_at = Some(at);
    let id = admit(store, held, None).await;
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(r.status, PushStatus::AwaitingSendAt);
    assert!(r.send_at.is_some());
    assert!(claim(store, 10, 60_000).await.is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(claim(store, 10, 60_000).await.len(), 1);
}

async fn waiting_for_quota_ends_at_the_deadline(ctx: StoreCtx) {
    let store = &ctx.store;
    let mut sync = push(true, delivery(false, false, false));
    sync.delivery = None;
    admit(store, sync, Some(groupcast_quota(1))).await;
    let mut d = delivery(false, true, true);
    d.deliver_by = OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
    let id = admit(store, push(true, d), Some(groupcast_quota(1))).await;
    assert!(claim(store, 10, 60_000).await.is_empty());
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(r.status, PushStatus::AwaitingQuota);
    // Due again at the deadline (before the day window ends), then it fails.
    let next = r.next_attempt_at.unwrap();
    assert!(
        next <= OffsetDateTime::now_utc() + time::Duration::seconds(1),
        "{next}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(claim(store, 10, 60_000).await.is_empty());
    let r = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_code.as_deref(), r.http_status),
        (PushStatus::Failed, Some("quota_wait_expired"), Some(429))
    );
    assert_eq!(used(store, 1).await, 1, "it never held a slot");
}

async fn history_lists_a_retried_push_with_its_attempts_and_next_try(ctx: StoreCtx) {
    // Arrange: a push tried once (Umeng busy) and put back to wait; another never tried.
    let store = &ctx.store;
    let tried = admit(store, push(false, delivery(false, false, false)), None).await;
    let c = claim(store, 1, 60_000).await.remove(0);
    let attempt = Attempt {
        number: 1,
        call: "send".into(),
        started_at: OffsetDateTime::now_utc(),
        outcome: "failed".into(),
        error_code: Some("2027".into()),
        latency_ms: 4,
    };
    let retry = DeliveryRetry {
        status: PushStatus::AwaitingSend,
        delay: Duration::from_secs(600),
        error_code: Some("2027".into()),
        error_msg: Some("busy".into()),
        umeng_response: None,
        attempts: vec![attempt],
        refund: true,
    };
    assert!(store.retry_delivery(&c, retry).await.unwrap());
    let fresh = admit(store, push(false, delivery(false, false, false)), None).await;

    // Act: History's query for the state.
    let rows = store
        .list_pushes(&PushQuery {
            status: Some(PushStatus::AwaitingSend),
            limit: 10,
            ..PushQuery::default()
        })
        .await
        .unwrap();

    // Assert: each summary says how often it was tried, why it failed, and when it is next.
    let row = |id: &str| rows.iter().find(|r| r.id == id).expect("listed");
    let (t, f) = (row(&tried), row(&fresh));
    assert_eq!(
        (t.attempt_count, t.error_code.as_deref(), t.delivery),
        (1, Some("2027"), DeliveryMode::Async)
    );
    let next = t.next_attempt_at.expect("next try");
    let wait = next - OffsetDateTime::now_utc();
    assert!(
        wait > time::Duration::minutes(9) && wait <= time::Duration::minutes(10),
        "next try in {wait}"
    );
    assert_eq!((f.attempt_count, f.error_code.as_deref()), (0, None));
    assert_eq!(
        store
            .get_push(&tried)
            .await
            .unwrap()
            .unwrap()
            .attempts
            .len(),
        1,
        "the summary counts the record's attempts"
    );
}

/// The PostgreSQL claim reads each app's queue through its ordered index whatever the
/// statistics say (migration 0011): a queue that fills faster than autovacuum analyzes the
/// table made the planner sort every due row on each claim. `create or replace` of the function drops
/// the setting, so a migration that replaces it must set it again.
#[tokio::test]
async fn postgres_the_claim_never_sorts_the_queue() {
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    // Every version: the previous one stays for replicas during a rolling upgrade.
    let versions = ctx
        .db
        .query_i64("select count(*) from pg_proc where proname = 'umgw_claim_deliveries'")
        .await;
    let settings = ctx
        .db
        .query_i64(
            "select count(*) from pg_proc
              where proname = 'umgw_claim_deliveries'
                and 'enable_sort=off' = any(proconfig) and 'jit=off' = any(proconfig)",
        )
        .await;
    assert!(versions >= 1);
    assert_eq!(
        settings, versions,
        "a version of umgw_claim_deliveries lost `set enable_sort = off` or `set jit = off`"
    );
    // Since migration 0017, the current version (older ones serve older replicas).
    let current = ctx
        .db
        .query_i64(
            "select count(*) from pg_proc
              where oid = 'umgw_claim_deliveries(integer, bigint, text[], text[], integer[], timestamptz[])'::regprocedure
                and 'enable_seqscan=off' = any(proconfig)",
        )
        .await;
    assert_eq!(
        current, 1,
        "umgw_claim_deliveries lost `set enable_seqscan = off`"
    );
}

/// A session's claims keep finding pushes through the indexes once the queue has grown
/// (migration 0017). PL/pgSQL keeps a statement's generic plan for the session from its
/// sixth call on, and one made while the queue was a page long may scan the whole table
/// at every claim after: 0016's update of the pushes a claim took did, on the session the
/// worker keeps for its claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_after_a_small_queue_read_no_whole_table() {
    use sqlx::{Connection, PgConnection};
    if crate::helpers::skip_postgres() {
        return;
    }
    let (store, db) = crate::helpers::postgres_store().await;
    let store = &store;
    let claim = "select count(*) from umgw_claim_deliveries(8, 60000, array['shop'], array[$1], \
                 array[10], array[null::timestamptz])";
    // Scans in this transaction's statistics, not yet flushed: read before and after.
    let scans = "select coalesce(sum(seq_scan), 0)::bigint from pg_stat_xact_user_tables \
                 where relname = 'pushes'";
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    // The session's first claims, each taking the one push of a one-page queue.
    for _ in 0..8 {
        admit(store, push(false, delivery(false, false, false)), None).await;
        let took: i64 = sqlx::query_scalar(claim)
            .bind(APPKEY)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(took, 1);
    }
    futures::future::join_all(
        (0..500).map(|_| admit(store, push(false, delivery(false, false, false)), None)),
    )
    .await;

    let mut tx = conn.begin().await.unwrap();
    let before: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
    let took: i64 = sqlx::query_scalar(claim)
        .bind(APPKEY)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let after: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(took, 8);
    assert_eq!(
        after - before,
        0,
        "a claim read the whole queue of 500 pushes"
    );
}

/// Two replicas claiming at the same moment (migration 0014): an older push of a bucket
/// that another claim holds, before it has taken its slot, keeps its place; the newer push
/// is not given the window's last slot ahead of it.
#[tokio::test]
async fn postgres_a_claim_does_not_overtake_an_older_push_another_claim_holds() {
    use sqlx::{Connection, PgConnection};
    if crate::helpers::skip_postgres() {
        return;
    }
    let ctx = StoreCtx::postgres().await;
    let store = &ctx.store;
    let older = admit(
        store,
        push(true, delivery(false, true, true)),
        Some(groupcast_quota(1)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newer = admit(
        store,
        push(true, delivery(false, true, true)),
        Some(groupcast_quota(1)),
    )
    .await;

    // The other replica's claim has locked the older push and not yet taken its slot.
    let mut other = PgConnection::connect(ctx.db.url()).await.expect("connect");
    let mut held = other.begin().await.expect("begin");
    sqlx::query("select id from pushes where id = $1 for update")
        .bind(&older)
        .fetch_one(&mut *held)
        .await
        .expect("lock the older push");
    assert!(
        claim(store, 10, 60_000).await.is_empty(),
        "the newer push does not take the slot the older one is about to take"
    );
    assert_eq!(status(store, &newer).await, PushStatus::AwaitingSend);
    assert_eq!(used(store, 1).await, 0);

    // That claim ends without the push (say its replica died): the order holds.
    held.rollback().await.expect("rollback");
    let claims = claim(store, 10, 60_000).await;
    let claimed: Vec<&str> = claims.iter().map(|c| c.push_id.as_str()).collect();
    assert_eq!(claimed, [older.as_str()]);
    assert_eq!(used(store, 1).await, 1);
    assert_eq!(status(store, &newer).await, PushStatus::AwaitingQuota);
}
