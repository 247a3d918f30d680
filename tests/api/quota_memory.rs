//! A replica's memory of full quota windows (`database.quota_full_recheck_ms`): a request
//! for a window the database called full is answered 429 without asking it again, and
//! what may reopen the window (a slot given back here, another replica's, the window's
//! end) is honoured. Every case runs on SQLite and on PostgreSQL, with apps of its own so
//! that its metric series are its alone.

use std::time::Duration;

use reqwest::Response;
use serde_json::{json, Value};
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::quota::{QuotaLimit, WindowUnit};

use crate::app::*;
use crate::observability::{scrape, settings_with_own_apps, value};

on_both_backends!(
    a_full_window_is_answered_from_memory_until_a_slot_comes_back_here,
    another_replicas_slot_is_seen_after_the_recheck,
    a_slot_umeng_gives_back_reopens_the_window_at_once,
    with_the_memory_off_every_admission_asks_the_database,
);

/// Settings with apps named after this test alone: a groupcast quota of one per hour for
/// the Android one (an hour, so that no window ends during the test), no delivery worker
/// (an asynchronous push keeps its slot until it is cancelled), and the memory's recheck.
fn one_slot(env: &TestEnv, android: &str, recheck_ms: u64) -> Settings {
    let ios = format!("{android}-ios");
    let mut s = settings_with_own_apps(env, android, &ios);
    s.apps[0].quotas.groupcast = Some(QuotaLimit {
        limit: 1,
        window: WindowUnit::Hour,
    });
    s.delivery.enabled = false;
    s.database.quota_full_recheck_ms = recheck_ms;
    s
}

fn own_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

fn groupcast(app: &str, key: Option<&str>) -> Value {
    let mut b = push_body(ANDROID_APP, "groupcast");
    b["app"] = json!(app);
    b["production_mode"] = json!(true);
    if let Some(key) = key {
        b["out_biz_no"] = json!(key);
    }
    b
}

/// 429s answered from memory, and all local quota rejections, of `app`'s groupcasts.
async fn rejections(gw: &TestApp, app: &str) -> (f64, f64) {
    let (_, samples) = scrape(gw).await;
    let labels = [("app", app), ("kind", "groupcast")];
    let from_memory = value(&samples, "quota_full_window_answers_total", &labels);
    let local = value(
        &samples,
        "quota_rejections_total",
        &[("app", app), ("kind", "groupcast"), ("source", "local")],
    );
    (from_memory, local)
}

fn production_sends(env: &TestEnv) -> usize {
    let sends = env.sends().into_iter();
    sends
        .filter(|s| s.production_mode.as_deref() == Some("true"))
        .count()
}

/// A 429 for the full one-slot window, with its headers and body.
async fn assert_full(r: Response) {
    assert_eq!(r.status(), 429);
    let secs: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&secs), "Retry-After {secs}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["from_umeng"], false, "{v}");
    assert_eq!(v["policy"], "groupcast", "{v}");
    assert_eq!(v["limit"], 1, "{v}");
    assert_eq!(v["window"], "hour", "{v}");
    assert_eq!(v["retry_after"], secs, "{v}");
}

/// An asynchronous push that takes the window's one slot and keeps it (no worker).
async fn take_the_slot(gw: &TestApp, app: &str) -> String {
    let r = gw.post_push_async(&groupcast(app, Some("held"))).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(gw.quota_used(app, "groupcast").await, 1);
    v["id"].as_str().unwrap().to_string()
}

async fn cancel(gw: &TestApp, id: &str) {
    let r = gw
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    gw.wait_for_status(id, &["withdrawn"], 5).await;
}

async fn a_full_window_is_answered_from_memory_until_a_slot_comes_back_here(backend: Backend) {
    // Arrange: a recheck of a minute, so only a slot given back here can reopen the window.
    let env = TestEnv::new(backend).await;
    let app = own_name("qm");
    let gw = env.spawn_app_with(one_slot(&env, &app, 60_000)).await;
    let held = take_the_slot(&gw, &app).await;

    // Act + assert: the admission that took the last slot told this replica the window
    // is full, so no refusal asks the database, keyed or not, synchronous or not.
    assert_full(gw.post_push(&groupcast(&app, Some("g-1"))).await).await;
    assert_full(gw.post_push(&groupcast(&app, None)).await).await;
    assert_full(gw.post_push_async(&groupcast(&app, Some("g-2"))).await).await;
    assert_eq!(rejections(&gw, &app).await, (3.0, 3.0));

    // A key that names a push is answered by the database, not by the memory: the held
    // push's own key is in flight, not refused for quota.
    let r = gw.post_push_async(&groupcast(&app, Some("held"))).await;
    assert_ne!(r.status(), 429, "{}", r.text().await.unwrap());
    // A test-mode push counts against no quota.
    let mut test_mode = groupcast(&app, None);
    test_mode["production_mode"] = json!(false);
    assert_eq!(gw.post_push(&test_mode).await.status(), 201);
    // A push that waits for quota is stored, not refused.
    let mut waits = groupcast(&app, Some("waits"));
    waits["on_quota_exhausted"] = json!("wait");
    assert_eq!(gw.post_push_async(&waits).await.status(), 202);
    assert_eq!(rejections(&gw, &app).await, (3.0, 3.0));
    assert_eq!(
        production_sends(&env),
        0,
        "no production send reached Umeng"
    );

    // Cancelling the held push gives its slot back here: the window reopens at once.
    cancel(&gw, &held).await;
    let r = gw.post_push(&groupcast(&app, Some("g-3"))).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(gw.quota_used(&app, "groupcast").await, 1);
    // And the push that took it filled the window again.
    assert_full(gw.post_push(&groupcast(&app, Some("g-4"))).await).await;
    assert_eq!(rejections(&gw, &app).await, (4.0, 4.0));
}

async fn another_replicas_slot_is_seen_after_the_recheck(backend: Backend) {
    // Arrange: replica `a` holds the slot; `slow` rechecks after a minute, `quick` after
    // 200 ms.
    let env = TestEnv::new(backend).await;
    let app = own_name("qr");
    let a = env.spawn_app_with(one_slot(&env, &app, 60_000)).await;
    let slow = env.spawn_app_with(one_slot(&env, &app, 60_000)).await;
    let quick = env.spawn_app_with(one_slot(&env, &app, 200)).await;
    let held = take_the_slot(&a, &app).await;
    assert_full(slow.post_push(&groupcast(&app, None)).await).await;
    assert_full(quick.post_push(&groupcast(&app, None)).await).await;

    // Act: `a` gives the slot back.
    cancel(&a, &held).await;

    // Assert: `slow` still answers from its memory (the documented staleness, bounded by
    // its recheck); `quick`, once its recheck has passed, asks the database and sends.
    assert_full(slow.post_push(&groupcast(&app, None)).await).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = quick.post_push(&groupcast(&app, Some("q-1"))).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(a.quota_used(&app, "groupcast").await, 1);
    assert_eq!(production_sends(&env), 1, "the one admitted push was sent");
}

async fn with_the_memory_off_every_admission_asks_the_database(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = own_name("qo");
    let gw = env.spawn_app_with(one_slot(&env, &app, 0)).await;
    let held = take_the_slot(&gw, &app).await;
    for key in ["o-1", "o-2", "o-3"] {
        assert_full(gw.post_push(&groupcast(&app, Some(key))).await).await;
    }
    assert_eq!(rejections(&gw, &app).await, (0.0, 3.0));
    cancel(&gw, &held).await;
    assert_eq!(
        gw.post_push(&groupcast(&app, None)).await.status(),
        201,
        "the slot given back is used"
    );
}

async fn a_slot_umeng_gives_back_reopens_the_window_at_once(backend: Backend) {
    // Arrange: each failing push takes the window's one slot (so this replica knows it
    // full), then Umeng refuses it for good (2022: a FAIL that is not 2050) and the slot
    // goes back.
    let env = TestEnv::new(backend).await;
    let app = own_name("qu");
    let gw = env.spawn_app_with(one_slot(&env, &app, 60_000)).await;

    // Synchronous: the failed send's record gives the slot back, and the memory with it.
    env.sim.add_fault(android_send_fails_once("2022", None));
    assert_eq!(
        gw.post_push(&groupcast(&app, Some("s-1"))).await.status(),
        502
    );
    let r = gw.post_push(&groupcast(&app, Some("s-2"))).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_full(gw.post_push(&groupcast(&app, None)).await).await;
    assert_eq!(rejections(&gw, &app).await, (1.0, 1.0));

    // Asynchronous (a database and an app of its own, and a delivery worker): the push
    // fails in the worker.
    let env = TestEnv::new(backend).await;
    let other = own_name("qu2");
    let mut settings = env.fast_delivery(one_slot(&env, &other, 60_000));
    settings.delivery.enabled = true;
    let gw2 = env.spawn_app_with(settings).await;
    env.sim.add_fault(android_send_fails_once("2022", None));
    let r = gw2.post_push_async(&groupcast(&other, Some("a-1"))).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let failed = gw2.wait_for_status(&id, &["failed"], 10).await;
    assert_eq!(failed["quota_refunded"], true, "{failed}");
    let r = gw2.post_push(&groupcast(&other, Some("a-2"))).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(rejections(&gw2, &other).await, (0.0, 0.0));
}
