//! The store contract of parent pushes and their parts: admission with every part's slot
//! all or nothing, settling the parent from its parts, a repeat that re-queues only the
//! parts that failed, and parents that wait as a whole until released. Every case runs
//! against SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use umeng_push_gateway::quota::{QuotaKind, QuotaLimit, WindowUnit};
use umeng_push_gateway::store::{
    AsyncDelivery, DeliveryApp, DeliveryClaim, Finish, NewPart, NewPush, PartsAdmission, PushQuery,
    PushStatus, QuotaAction, QuotaClaim, Store,
};

use crate::helpers::StoreCtx;

crate::store_cases!(
    parts_are_admitted_with_every_slot_or_nothing_is_written,
    the_parent_is_settled_when_its_last_part_ends,
    a_repeat_requeues_only_the_parts_that_failed,
    a_held_parent_is_released_with_its_slots_when_due,
    a_waiting_parent_takes_no_slot_until_every_window_has_room,
);

const MEMBERS: [(&str, &str); 2] = [("shop-android", "key-a"), ("shop-ios", "key-i")];

fn broadcast_quota(limit: u32) -> QuotaClaim {
    QuotaClaim {
        kind: QuotaKind::Broadcast,
        limit: QuotaLimit {
            limit,
            window: WindowUnit::Day,
        },
    }
}

fn delivery(hold: bool, quota_wait: bool) -> AsyncDelivery {
    AsyncDelivery {
        outbox: json!({"body": {"type": "broadcast"}}),
        hold,
        deliver_by: OffsetDateTime::now_utc() + time::Duration::hours(1),
        quota_wait,
        defer_quota: false,
    }
}

fn parent(key: Option<&str>, gate: Option<AsyncDelivery>) -> NewPush {
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: "group:shop".into(),
        platform: "all".into(),
        cast_type: "broadcast".into(),
        task_class: true,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: key.map(str::to_owned),
        fingerprint: "parent-fp".into(),
        request: json!({"app": "shop", "type": "broadcast"}),
        description: None,
        send_at: gate
            .as_ref()
            .filter(|g| g.hold)
            .map(|_| OffsetDateTime::now_utc() - time::Duration::seconds(1)),
        delivery: gate,
    }
}

/// One part per member, each taking a broadcast slot of `limits[i]`.
fn parts(limits: [u32; 2], hold: bool) -> Vec<NewPart> {
    MEMBERS
        .iter()
        .zip(limits)
        .enumerate()
        .map(|(i, ((app, appkey), limit))| NewPart {
            push: NewPush {
                id: uuid::Uuid::now_v7().to_string(),
                app: (*app).into(),
                appkey: (*appkey).into(),
                platform: if i == 0 { "android" } else { "ios" }.into(),
                cast_type: "broadcast".into(),
                task_class: true,
                production_mode: true,
                client: "backend".into(),
                out_biz_no: Some(format!("k/{}", i + 1)),
                fingerprint: format!("part-fp-{i}"),
                request: json!({"part": i + 1}),
                description: None,
                send_at: None,
                delivery: Some(delivery(hold, false)),
            },
            part_no: u32::try_from(i + 1).unwrap(),
            audience: None,
            quota: Some(broadcast_quota(limit)),
        })
        .collect()
}

fn apps() -> Vec<DeliveryApp> {
    MEMBERS
        .iter()
        .map(|(app, appkey)| DeliveryApp {
            app: (*app).into(),
            appkey: (*appkey).into(),
            limit: 10,
            due_from: None,
        })
        .collect()
}

async fn used(store: &Arc<dyn Store>, appkey: &str) -> u32 {
    let q = broadcast_quota(10);
    store
        .quota_state(appkey, q.kind, q.limit)
        .await
        .unwrap()
        .used
}

async fn claim_all(store: &Arc<dyn Store>) -> Vec<DeliveryClaim> {
    store
        .claim_deliveries(10, Duration::from_secs(60), &apps())
        .await
        .expect("claim")
}

fn outcome(claim: &DeliveryClaim, status: PushStatus) -> Finish {
    let ok = status == PushStatus::Accepted;
    Finish {
        status,
        umeng_request: None,
        umeng_response: None,
        msg_id: None,
        task_id: ok.then(|| format!("task-{}", claim.push_id)),
        file_id: None,
        error_code: (!ok).then(|| "2003".into()),
        error_msg: None,
        http_status: if ok { 201 } else { 502 },
        latency_ms: Some(1),
        sent_at: Some(OffsetDateTime::now_utc()),
        quota: if ok {
            QuotaAction::Keep
        } else {
            QuotaAction::Refund
        },
        attempts: Vec::new(),
        claim: Some(claim.claim),
    }
}

async fn admitted(store: &Arc<dyn Store>, p: NewPush, parts: Vec<NewPart>) -> (String, Vec<u32>) {
    match store.admit_parts(p, parts).await.expect("admit") {
        PartsAdmission::Admitted {
            push_id, resent, ..
        } => (push_id, resent),
        other => panic!("expected Admitted, got {other:?}"),
    }
}

async fn parts_are_admitted_with_every_slot_or_nothing_is_written(ctx: StoreCtx) {
    let store = &ctx.store;
    // The iOS window has room for one.
    let (id, _) = admitted(store, parent(Some("a"), None), parts([5, 1], false)).await;
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::Pending);
    assert_eq!(record.part_count, Some(2));
    assert_eq!(record.parts.len(), 2);
    assert!(record
        .parts
        .iter()
        .all(|p| p.status == PushStatus::AwaitingSend));
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (1, 1)
    );

    // The next one finds the iOS window full: nothing taken, nothing stored.
    match store
        .admit_parts(parent(Some("b"), None), parts([5, 1], false))
        .await
        .unwrap()
    {
        PartsAdmission::RateLimited { app, quota } => {
            assert_eq!(app, "shop-ios");
            assert_eq!((quota.used, quota.limit), (1, 1));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (1, 1)
    );
    let list = store
        .list_pushes(&PushQuery {
            limit: 10,
            ..PushQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        list.len(),
        1,
        "parts are not listed, refusals leave nothing"
    );
    assert_eq!(list[0].parts, Some(2));
}

async fn the_parent_is_settled_when_its_last_part_ends(ctx: StoreCtx) {
    let store = &ctx.store;
    let (id, _) = admitted(store, parent(None, None), parts([5, 5], false)).await;
    let claims = claim_all(store).await;
    assert_eq!(claims.len(), 2);
    assert!(claims
        .iter()
        .all(|c| c.parent_id.as_deref() == Some(id.as_str())));
    assert!(store
        .finish(
            &claims[0].push_id,
            outcome(&claims[0], PushStatus::Accepted).into()
        )
        .await
        .unwrap());
    assert_eq!(
        store.settle_parent(&id).await.unwrap(),
        None,
        "one part still out"
    );
    assert!(store
        .finish(
            &claims[1].push_id,
            outcome(&claims[1], PushStatus::Accepted).into()
        )
        .await
        .unwrap());
    assert_eq!(
        store.settle_parent(&id).await.unwrap(),
        Some(PushStatus::Accepted)
    );
    assert_eq!(
        store.settle_parent(&id).await.unwrap(),
        None,
        "settled once"
    );
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.http_status),
        (PushStatus::Accepted, Some(201))
    );
    assert!(record.finished_at.is_some() && record.sent_at.is_some());
    // A part's task_id finds the parent.
    let task = record.parts[1].task_id.clone().unwrap();
    let found = store
        .list_pushes(&PushQuery {
            task_id: Some(task),
            limit: 10,
            ..PushQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, id);
    assert_eq!(store.settle_parents(10).await.unwrap(), 0);
}

async fn a_repeat_requeues_only_the_parts_that_failed(ctx: StoreCtx) {
    let store = &ctx.store;
    let (id, _) = admitted(store, parent(Some("k"), None), parts([5, 5], false)).await;
    let claims = claim_all(store).await;
    let (android, ios) = if claims[0].app == "shop-android" {
        (&claims[0], &claims[1])
    } else {
        (&claims[1], &claims[0])
    };
    store
        .finish(
            &android.push_id,
            outcome(android, PushStatus::Accepted).into(),
        )
        .await
        .unwrap();
    store
        .finish(&ios.push_id, outcome(ios, PushStatus::Failed).into())
        .await
        .unwrap();
    // Settled by the sweep this time (as after a part that ended without its worker).
    assert_eq!(store.settle_parents(10).await.unwrap(), 1);
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.http_status),
        (PushStatus::Partial, Some(207))
    );
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (1, 0)
    );

    // The repeat: the same parent, only part 2 waits again, with a slot of its own.
    let (again, resent) = admitted(store, parent(Some("k"), None), parts([5, 5], false)).await;
    assert_eq!((again.as_str(), resent), (id.as_str(), vec![2]));
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::Pending);
    assert_eq!(record.parts[0].status, PushStatus::Accepted);
    assert_eq!(record.parts[1].status, PushStatus::AwaitingSend);
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (1, 1)
    );
    let claims = claim_all(store).await;
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].app, "shop-ios");
    assert_eq!(claims[0].claim, 1, "a fresh round of attempts");
    // While it is out, a repeat replays the parent.
    match store
        .admit_parts(parent(Some("k"), None), parts([5, 5], false))
        .await
        .unwrap()
    {
        PartsAdmission::Replay { push } => assert_eq!(push.id, id),
        other => panic!("expected Replay, got {other:?}"),
    }
    // A different request under the key is refused.
    let mut other = parent(Some("k"), None);
    other.fingerprint = "another".into();
    assert!(matches!(
        store
            .admit_parts(other, parts([5, 5], false))
            .await
            .unwrap(),
        PartsAdmission::Mismatch { .. }
    ));
}

async fn a_held_parent_is_released_with_its_slots_when_due(ctx: StoreCtx) {
    let store = &ctx.store;
    let (id, _) = admitted(
        store,
        parent(Some("h"), Some(delivery(true, false))),
        parts([5, 5], true),
    )
    .await;
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::AwaitingSendAt);
    assert!(record.parts.is_empty(), "its parts wait inside it");
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (0, 0)
    );
    assert!(claim_all(store).await.is_empty());

    assert_eq!(store.release_parents(10).await.unwrap(), 1);
    assert_eq!(store.release_parents(10).await.unwrap(), 0, "released once");
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::Pending);
    assert!(record
        .parts
        .iter()
        .all(|p| p.status == PushStatus::AwaitingSend));
    assert_eq!(
        (used(store, "key-a").await, used(store, "key-i").await),
        (1, 1)
    );
    assert_eq!(claim_all(store).await.len(), 2);
}

async fn a_waiting_parent_takes_no_slot_until_every_window_has_room(ctx: StoreCtx) {
    let store = &ctx.store;
    // The iOS window (limit 1) is taken by another parent.
    admitted(store, parent(None, None), parts([5, 1], false)).await;
    let (id, _) = admitted(
        store,
        parent(Some("w"), Some(delivery(false, true))),
        parts([5, 1], false),
    )
    .await;
    let record = store.get_push(&id).await.unwrap().unwrap();
    assert_eq!(record.status, PushStatus::AwaitingQuota);
    let due = record.next_attempt_at.expect("due when the window ends");
    assert!(due > OffsetDateTime::now_utc());
    assert_eq!(
        used(store, "key-a").await,
        1,
        "no Android slot taken while it waits"
    );
    // Not due yet: nothing released. (The window ends at Beijing midnight.)
    assert_eq!(store.release_parents(10).await.unwrap(), 0);
    // Withdrawn while it waits: final, nothing sent.
    assert!(store.withdraw(&id).await.unwrap());
    assert_eq!(
        store.get_push(&id).await.unwrap().unwrap().status,
        PushStatus::Withdrawn
    );
}
