//! History partitions on PostgreSQL (migration 0011): weeks made ahead, whole weeks dropped
//! by the retention with their keys and callback events, and an existing database upgraded
//! without losing a row. PostgreSQL only: SQLite has no partitions.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPool;
use umeng_push_gateway::store::{Admission, NewPush, Store};

use crate::helpers::{empty_postgres_db, postgres_store, skip_postgres, PgTestDb};

const APPKEY: &str = "appkey-1";
const DAY: Duration = Duration::from_secs(86_400);

fn push(out_biz_no: Option<&str>) -> NewPush {
    NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: "shop".into(),
        appkey: APPKEY.into(),
        platform: "android".into(),
        cast_type: "unicast".into(),
        task_class: false,
        production_mode: true,
        client: "backend".into(),
        out_biz_no: out_biz_no.map(str::to_owned),
        fingerprint: "fp".into(),
        request: json!({"type": "unicast"}),
        description: None,
        send_at: None,
        delivery: None,
    }
}

async fn admitted(store: &Arc<dyn Store>, p: NewPush) -> String {
    match store.admit(p, None).await {
        Ok(Admission::Admitted { push_id, .. }) => push_id,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

async fn pool(db: &PgTestDb) -> PgPool {
    match PgPool::connect(db.url()).await {
        Ok(p) => p,
        Err(e) => panic!("cannot connect to {}: {e}", db.name()),
    }
}

async fn scalar_i64(pool: &PgPool, sql: &str) -> i64 {
    match sqlx::query_scalar(sql).fetch_one(pool).await {
        Ok(n) => n,
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn scalar_text(pool: &PgPool, sql: &str) -> String {
    match sqlx::query_scalar(sql).fetch_one(pool).await {
        Ok(n) => n,
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// The partitions of `pushes`, by name.
async fn partitions(pool: &PgPool) -> Vec<String> {
    let sql = "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid
                where i.inhparent = 'pushes'::regclass order by 1";
    match sqlx::query_scalar(sql).fetch_all(pool).await {
        Ok(names) => names,
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// The partition a push's row is in.
async fn partition_of(pool: &PgPool, id: &str) -> String {
    scalar_text(
        pool,
        &format!("select tableoid::regclass::text from pushes where id = '{id}'"),
    )
    .await
}

/// The partition name of the week `days` from now.
async fn week_of(pool: &PgPool, days: i64) -> String {
    scalar_text(
        pool,
        &format!(
            "select 'pushes_w' || to_char(to_timestamp(umgw_week_start(now() + interval \
             '{days} days') / 1000) at time zone 'UTC', 'YYYYMMDD')"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weeks_are_made_ahead_and_a_young_history_is_kept() {
    if skip_postgres() {
        return;
    }
    let (store, db) = postgres_store().await;
    let pool = pool(&db).await;
    let parts = partitions(&pool).await;
    assert!(parts.contains(&"pushes_legacy".to_string()), "{parts:?}");
    for weeks in 1..=4 {
        let week = week_of(&pool, 7 * weeks).await;
        assert!(parts.contains(&week), "{week} missing from {parts:?}");
    }

    let id = admitted(&store, push(Some("biz-1"))).await;
    // A fresh database's first partition holds the current week.
    assert_eq!(partition_of(&pool, &id).await, "pushes_legacy");
    // Nothing is old enough: the rotation drops nothing and keeps the weeks.
    match store.rotate_history(Some(90 * DAY)).await {
        Ok(0) => {}
        other => panic!("expected nothing dropped, got {other:?}"),
    }
    match store.rotate_history(None).await {
        Ok(0) => {}
        other => panic!("expected nothing dropped, got {other:?}"),
    }
    assert_eq!(partitions(&pool).await, parts);
    assert!(matches!(store.get_push(&id).await, Ok(Some(_))));
    // Starting again (migrate runs at every start) is harmless.
    assert!(store.migrate().await.is_ok());
    assert_eq!(partitions(&pool).await, parts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_week_is_dropped_whole_with_its_keys_and_events() {
    if skip_postgres() {
        return;
    }
    let (store, db) = postgres_store().await;
    let pool = pool(&db).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(admitted(&store, push(Some(&format!("old-{i}")))).await);
    }
    ids.push(admitted(&store, push(None)).await);
    let event = format!(
        "insert into callback_events (id, push_id, event_type, client, url, data) \
         values ('evt-1', '{}', 'push.accepted', 'backend', 'http://127.0.0.1:9/cb', '{{}}')",
        ids[0]
    );
    if let Err(e) = sqlx::query(&event).execute(&pool).await {
        panic!("{e}");
    }

    // Time moves on by a fortnight past the retention: every week up to next week's end is
    // expired (the retention is expressed here as a cutoff in the future).
    let dropped = scalar_i64(
        &pool,
        "select umgw_rotate_history(now() + interval '15 days', 1000, 4)",
    )
    .await;
    assert_eq!(dropped, 6, "the six pushes, counted");
    for id in &ids {
        assert!(matches!(store.get_push(id).await, Ok(None)), "{id} dropped");
    }
    assert_eq!(
        scalar_i64(&pool, "select count(*) from idempotency_keys").await,
        0
    );
    assert_eq!(
        scalar_i64(&pool, "select count(*) from callback_events").await,
        0
    );
    let parts = partitions(&pool).await;
    assert!(!parts.contains(&"pushes_legacy".to_string()), "{parts:?}");
    // The current week, which pushes_legacy held, has a partition of its own again.
    let this_week = week_of(&pool, 0).await;
    assert!(
        parts.contains(&this_week),
        "{this_week} missing from {parts:?}"
    );

    // New pushes go on, and an out_biz_no of a dropped push is free again.
    let fresh = admitted(&store, push(Some("old-0"))).await;
    assert_eq!(partition_of(&pool, &fresh).await, this_week);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_keeps_the_history_in_place() {
    if skip_postgres() {
        return;
    }
    let db = empty_postgres_db().await;
    let pool = pool(&db).await;
    // The schema before partitions (migrations up to 0010), with a push in it.
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = Cow::Owned(
        before
            .migrations
            .iter()
            .filter(|m| m.version < 11)
            .cloned()
            .collect(),
    );
    if let Err(e) = before.run(&pool).await {
        panic!("migrating to 0010: {e}");
    }
    let id = uuid::Uuid::now_v7().to_string();
    for sql in [
        format!(
            "insert into pushes (id, app, appkey, platform, cast_type, task_class, \
             production_mode, client, out_biz_no, fingerprint, status, request, http_status) \
             values ('{id}', 'shop', '{APPKEY}', 'android', 'unicast', false, true, 'backend', \
             'biz-1', 'fp', 'accepted', '{{\"type\": \"unicast\"}}', 200)"
        ),
        format!(
            "insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id) \
             values ('{APPKEY}', 'biz-1', 'fp', '{id}')"
        ),
    ] {
        if let Err(e) = sqlx::query(&sql).execute(&pool).await {
            panic!("{sql}: {e}");
        }
    }

    let store = db.connect_again().await;
    if let Err(e) = store.migrate().await {
        panic!("migrating to partitions: {e}");
    }
    assert_eq!(partition_of(&pool, &id).await, "pushes_legacy");
    match store.get_push(&id).await {
        Ok(Some(p)) => assert_eq!(p.out_biz_no.as_deref(), Some("biz-1")),
        other => panic!("the old push is gone: {other:?}"),
    }
    // Its key still answers a repeat.
    match store.admit(push(Some("biz-1")), None).await {
        Ok(Admission::Replay { push }) => assert_eq!(push.id, id),
        other => panic!("expected a replay, got {other:?}"),
    }
    // The old table's indexes were adopted, not built a second time.
    assert_eq!(
        scalar_i64(
            &pool,
            "select count(*) from pg_index where indrelid = 'pushes_legacy'::regclass"
        )
        .await,
        scalar_i64(
            &pool,
            "select count(*) from pg_index where indrelid = 'pushes'::regclass"
        )
        .await
    );
    let id2 = admitted(&store, push(None)).await;
    assert!(matches!(store.get_push(&id2).await, Ok(Some(_))));
}
