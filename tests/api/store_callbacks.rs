//! Callback events in the store, on SQLite and PostgreSQL: written with the state change
//! (once per push and state), claimed with a lease, fenced by the claim's attempt number.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use umeng_push_gateway::store::{
    Admission, CallbackAttempt, CallbackClaim, CallbackNext, CallbackState, Finish, NewPush,
    PushStatus, QuotaAction, Store, TaskUpdate,
};

use crate::helpers::StoreCtx;

crate::store_cases!(
    events_are_written_with_the_state_change_once_per_state,
    an_expired_lease_lets_another_worker_deliver,
    a_failed_attempt_is_kept_and_retried_later,
);

const URL: &str = "https://hooks.example.com/umeng/1";
const LONG_LEASE: Duration = Duration::from_secs(60);

fn push(callback_url: Option<&str>) -> NewPush {
    let mut request = json!({"type": "groupcast", "filter": {"where": {"and": [{"tag": "vip"}]}}});
    if let Some(url) = callback_url {
        request["callback_url"] = json!(url);
    }
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: "appkey-1".into(),
        platform: "android".into(),
        cast_type: "groupcast".into(),
        task_class: true,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: None,
        fingerprint: "fp-1".into(),
        request,
        description: None,
        send_at: None,
        delivery: None,
    }
}

fn finish(status: PushStatus) -> Finish {
    Finish {
        status,
        umeng_request: None,
        umeng_response: Some(json!({"ret": "SUCCESS", "data": {"task_id": "t-1"}})),
        msg_id: None,
        task_id: Some("t-1".into()),
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

async fn admitted(store: &Arc<dyn Store>, new: NewPush) -> String {
    match store.admit(new, None).await.expect("admit") {
        Admission::Admitted { push_id, .. } => push_id,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

async fn claim(store: &Arc<dyn Store>, lease: Duration) -> Vec<CallbackClaim> {
    store.claim_callbacks(10, lease).await.expect("claim")
}

fn task(status: PushStatus) -> TaskUpdate {
    TaskUpdate {
        status,
        task_status: json!({"status": 2}),
        seen_checked_at: None,
        claim: None,
    }
}

fn attempt(number: u32, http_status: u16) -> CallbackAttempt {
    CallbackAttempt {
        number,
        at: OffsetDateTime::now_utc(),
        http_status: Some(http_status),
        error: None,
        latency_ms: 3,
    }
}

async fn events_are_written_with_the_state_change_once_per_state(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, push(Some(URL))).await;
    let silent = admitted(store, push(None)).await;
    assert!(
        claim(store, LONG_LEASE).await.is_empty(),
        "pending: no event"
    );

    assert!(store
        .finish(&id, finish(PushStatus::Accepted).into())
        .await
        .unwrap());
    assert!(store
        .finish(&silent, finish(PushStatus::Accepted).into())
        .await
        .unwrap());
    // A second finisher changes nothing, and writes no second event.
    assert!(!store
        .finish(&id, finish(PushStatus::Failed).into())
        .await
        .unwrap());
    let claims = claim(store, LONG_LEASE).await;
    assert_eq!(claims.len(), 1, "{claims:?}");
    let c = &claims[0];
    assert_eq!(c.event_type, "push.accepted");
    assert_eq!(c.push_id, id);
    assert_eq!(c.url, URL);
    assert_eq!(c.client, "backend");
    assert_eq!(c.attempt, 1);
    assert_eq!(c.data["status"], "accepted");
    assert_eq!(c.data["task_id"], "t-1");
    assert_eq!(c.data["production_mode"], true);
    assert!(c.data.get("request").is_none());
    assert!(store
        .record_callback(c, &[attempt(1, 204)], CallbackNext::Delivered)
        .await
        .unwrap());

    // A task state on the way is no event; the final one is.
    assert!(store
        .update_task(&id, task(PushStatus::Sending))
        .await
        .unwrap());
    assert!(claim(store, LONG_LEASE).await.is_empty());
    assert!(store
        .update_task(&id, task(PushStatus::Done))
        .await
        .unwrap());
    assert!(store
        .update_task(&silent, task(PushStatus::Done))
        .await
        .unwrap());
    let claims = claim(store, LONG_LEASE).await;
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].event_type, "push.done");
    assert_eq!(claims[0].data["status"], "done");

    let record = store.get_push(&id).await.unwrap().expect("push");
    assert_eq!(record.callback_url.as_deref(), Some(URL));
    let events: Vec<(&str, CallbackState)> = record
        .callbacks
        .iter()
        .map(|e| (e.event_type.as_str(), e.state))
        .collect();
    assert_eq!(
        events,
        [
            ("push.accepted", CallbackState::Delivered),
            ("push.done", CallbackState::Pending)
        ]
    );
    let attempts = &record.callbacks[0].attempts;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].number, attempts[0].http_status),
        (1, Some(204))
    );
    let silent = store.get_push(&silent).await.unwrap().expect("push");
    assert!(silent.callback_url.is_none() && silent.callbacks.is_empty());
}

async fn an_expired_lease_lets_another_worker_deliver(ctx: StoreCtx) {
    let a = &ctx.store;
    let b = ctx.db.connect_again().await;
    let id = admitted(a, push(Some(URL))).await;
    assert!(a
        .finish(&id, finish(PushStatus::Failed).into())
        .await
        .unwrap());

    // Worker A claims and "dies" mid-delivery; while its lease runs nobody else gets it.
    let short = Duration::from_millis(400);
    let first = claim(a, short).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].event_type, "push.failed");
    assert!(claim(&b, short).await.is_empty(), "leased");

    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = claim(&b, LONG_LEASE).await;
    assert_eq!(second.len(), 1, "the lease ran out: B takes the event");
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].attempt, 2);

    // A's late record is fenced out; B's counts.
    assert!(!a
        .record_callback(&first[0], &[attempt(1, 200)], CallbackNext::Delivered)
        .await
        .unwrap());
    assert!(b
        .record_callback(&second[0], &[attempt(2, 200)], CallbackNext::Delivered)
        .await
        .unwrap());
    let record = a.get_push(&id).await.unwrap().expect("push");
    assert_eq!(record.callbacks.len(), 1);
    assert_eq!(record.callbacks[0].state, CallbackState::Delivered);
    assert_eq!(record.callbacks[0].attempts.len(), 1);
    assert_eq!(record.callbacks[0].attempts[0].number, 2);
    assert!(record.callbacks[0].finished_at.is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        claim(a, LONG_LEASE).await.is_empty(),
        "delivered: never again"
    );
}

async fn a_failed_attempt_is_kept_and_retried_later(ctx: StoreCtx) {
    let store = &ctx.store;
    let id = admitted(store, push(Some(URL))).await;
    assert!(store
        .finish(&id, finish(PushStatus::Unknown).into())
        .await
        .unwrap());
    let first = claim(store, LONG_LEASE).await;
    assert_eq!(first[0].event_type, "push.unknown");
    let log = [attempt(1, 503)];
    assert!(store
        .record_callback(
            &first[0],
            &log,
            CallbackNext::RetryIn(Duration::from_millis(300))
        )
        .await
        .unwrap());
    assert!(claim(store, LONG_LEASE).await.is_empty(), "not due yet");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = claim(store, LONG_LEASE).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, 2);
    assert_eq!(second[0].log.len(), 1);
    assert_eq!(second[0].log[0].http_status, Some(503));
    assert!(store
        .record_callback(
            &second[0],
            &[log[0].clone(), attempt(2, 500)],
            CallbackNext::GiveUp
        )
        .await
        .unwrap());
    let record = store.get_push(&id).await.unwrap().expect("push");
    assert_eq!(record.callbacks[0].state, CallbackState::GaveUp);
    assert_eq!(record.callbacks[0].attempts.len(), 2);
    assert!(record.callbacks[0].next_attempt_at.is_none());
}
