//! Asynchronous delivery: `Prefer: respond-async`, the delivery worker, retries with
//! backoff, `send_at` with local cancel, waiting for quota, and where these meet (a held
//! push and the quota, a retry and the quota, two replicas and one queue). Every case runs
//! on SQLite and on PostgreSQL.

use std::time::Duration;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

on_both_backends!(
    an_async_push_is_answered_202_and_delivered_by_a_worker,
    a_repeat_replays_the_current_state_and_another_replica_sends_it,
    transient_failures_are_retried_with_backoff_then_delivered,
    a_definite_failure_is_final_at_once,
    a_unicast_timeout_is_unknown_and_never_resent,
    a_task_class_timeout_is_resent_with_the_same_out_biz_no,
    send_at_holds_the_push_and_cancel_withdraws_it,
    a_held_push_takes_its_quota_slot_when_it_is_sent,
    quota_wait_sends_first_come_first_served_across_two_replicas,
    an_async_reject_push_still_gets_429_for_a_full_window,
    async_fields_are_checked,
    history_finds_waiting_pushes,
    async_pushes_wait_while_the_breaker_is_open,
    an_async_filecast_uploads_its_lines_then_sends_and_forgets_them,
    an_app_at_its_concurrency_limit_does_not_stall_the_worker,
    a_push_due_before_the_last_claimed_one_is_still_sent,
);

/// Test settings with a fast delivery worker.
fn fast(env: &TestEnv) -> Settings {
    env.fast_delivery(env.settings())
}

/// POST asynchronously, asserting 202; returns the push view.
async fn accepted_202(app: &TestApp, body: &Value) -> Value {
    let r = app.post_push_async(body).await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let view: Value = r.json().await.unwrap();
    view
}

fn send_fault(kind: FaultKind, times: u32) -> Fault {
    Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind,
        times: Some(times),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

async fn an_async_push_is_answered_202_and_delivered_by_a_worker(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let mut body = push_body(ANDROID_APP, "unicast");
    body["out_biz_no"] = json!("async-1");
    let r = app.post_push_async(&body).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let view: Value = r.json().await.unwrap();
    let id = view["id"].as_str().unwrap().to_owned();
    assert_eq!(view["status"], "awaiting_send");
    assert_eq!(view["out_biz_no"], "async-1");

    let done = app.wait_for_status(&id, &["accepted"], 10).await;
    assert!(done["msg_id"].is_string(), "{done}");
    assert_eq!(done["delivery"], "async");
    assert_eq!(done["http_status"], 201);
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{done}");
    assert_eq!(attempts[0]["outcome"], "accepted");
    assert_eq!(env.sends().len(), 1);

    // A repeat after delivery replays the stored answer.
    let again = app.post_push(&body).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(env.sends().len(), 1);
    app.stop().await;
}

async fn a_repeat_replays_the_current_state_and_another_replica_sends_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // This replica accepts pushes but runs no delivery worker.
    let mut quiet = fast(&env);
    quiet.delivery.enabled = false;
    let front = env.spawn_app_with(quiet).await;
    let mut body = push_body(ANDROID_APP, "unicast");
    body["out_biz_no"] = json!("async-repeat");
    let view = accepted_202(&front, &body).await;
    let id = view["id"].as_str().unwrap().to_owned();

    for repeat in [
        front.post_push_async(&body).await,
        front.post_push(&body).await,
    ] {
        assert_eq!(repeat.status(), 202);
        assert_eq!(repeat.headers()["idempotent-replayed"], "true");
        let v: Value = repeat.json().await.unwrap();
        assert_eq!(
            (v["id"].as_str(), &v["status"]),
            (Some(id.as_str()), &json!("awaiting_send"))
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.sends().is_empty(), "nothing runs the queue yet");

    let worker = env.spawn_app_with(fast(&env)).await;
    let done = front.wait_for_status(&id, &["accepted"], 10).await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(env.sends().len(), 1);
    worker.stop().await;
    front.stop().await;
}

async fn transient_failures_are_retried_with_backoff_then_delivered(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    // 2028 (timestamp expired): Umeng refused the call, a fresh one may pass.
    env.sim.add_fault(send_fault(
        FaultKind::ErrorCode {
            code: "2028".into(),
            message: None,
        },
        2,
    ));
    let view = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
    let id = view["id"].as_str().unwrap();
    let done = app.wait_for_status(id, &["accepted", "failed"], 15).await;
    assert_eq!(done["status"], "accepted", "{done}");
    let attempts = done["attempts"].as_array().unwrap();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "accepted"], "{done}");
    assert_eq!(attempts[0]["error_code"], "2028");
    let numbers: Vec<u64> = attempts
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(env.sends().len(), 3);
    app.stop().await;
}

async fn a_definite_failure_is_final_at_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    env.sim.add_fault(send_fault(
        FaultKind::ErrorCode {
            code: "2003".into(),
            message: Some("bad token".into()),
        },
        1,
    ));
    let view = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
    let done = app
        .wait_for_status(view["id"].as_str().unwrap(), &["failed"], 10)
        .await;
    assert_eq!(done["error_code"], "2003");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    assert!(done["next_attempt_at"].is_null(), "{done}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.sends().len(), 1, "a definite failure is not retried");
    app.stop().await;
}

async fn a_unicast_timeout_is_unknown_and_never_resent(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    env.sim.add_fault(send_fault(FaultKind::Hang, 1));
    let view = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
    let done = app
        .wait_for_status(view["id"].as_str().unwrap(), &["unknown"], 15)
        .await;
    assert_eq!(done["error_code"], "timeout");
    assert_eq!(done["http_status"], 504);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.sends().len(),
        1,
        "a unicast that may have arrived is not sent again"
    );
    app.stop().await;
}

async fn a_task_class_timeout_is_resent_with_the_same_out_biz_no(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    env.sim.add_fault(send_fault(FaultKind::Hang, 1));
    // No out_biz_no from the caller: the gateway gives the task one of its own.
    let view = accepted_202(&app, &push_body(ANDROID_APP, "groupcast")).await;
    let id = view["id"].as_str().unwrap();
    let done = app
        .wait_for_status(id, &["accepted", "queued", "sending", "done"], 20)
        .await;
    assert!(done["task_id"].is_string(), "{done}");
    let outcomes: Vec<&str> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["timeout", "accepted"], "{done}");
    let sends = env.sends();
    assert_eq!(sends.len(), 2);
    let keys: Vec<Option<&str>> = sends.iter().map(|s| s.out_biz_no.as_deref()).collect();
    assert_eq!(keys[0], keys[1], "both sends carry one out_biz_no");
    assert_eq!(keys[0], Some(format!("umgw-{id}").as_str()));
    app.stop().await;
}

async fn send_at_holds_the_push_and_cancel_withdraws_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let mut body = push_body(ANDROID_APP, "unicast");
    body["send_at"] = json!(rfc3339(soon));
    // send_at alone makes the push asynchronous: 202 without the Prefer header.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("preference-applied").is_none());
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "awaiting_send_at");
    assert!(view["send_at"].is_string(), "{view}");
    let id = view["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(env.sends().is_empty(), "held until send_at");
    let done = app.wait_for_status(&id, &["accepted"], 10).await;
    let sent_at = OffsetDateTime::parse(done["sent_at"].as_str().unwrap(), &Rfc3339).unwrap();
    assert!(sent_at >= soon, "sent at {sent_at}, not before {soon}");

    // A push held for an hour is withdrawn by cancel: Umeng never hears of it.
    let mut later = push_body(ANDROID_APP, "unicast");
    later["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::hours(1)
    ));
    later["callback_url"] = Value::Null;
    let view: Value = app.post_push(&later).await.json().await.unwrap();
    let id = view["id"].as_str().unwrap();
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "withdrawn");
    // Cancelling again answers the same.
    let again = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(again.status(), 200);
    assert!(env.sim.requests().iter().all(|r| r.path != "/api/cancel"));
    assert_eq!(env.sends().len(), 1);
    app.stop().await;
}

/// The worker's claims read each app's queue from where the last push it claimed was due,
/// and the whole queue every few seconds: a push due before that, which those claims do
/// not see (committed late, or held by another transaction when they ran), is still sent.
async fn a_push_due_before_the_last_claimed_one_is_still_sent(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    // A push held for an hour, then one sent at once: the worker claims the second.
    let mut held = push_body(ANDROID_APP, "unicast");
    held["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::hours(1)
    ));
    let r = app.post_push(&held).await;
    assert_eq!(r.status(), 202);
    let held: Value = r.json().await.unwrap();
    let held = held["id"].as_str().unwrap().to_owned();
    let now = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
    app.wait_for_status(now["id"].as_str().unwrap(), &["accepted"], 10)
        .await;

    // The held push falls due an hour ago: before the push just claimed.
    let an_hour_ago = match backend {
        Backend::Sqlite => "(cast(strftime('%s', 'now') as integer) - 3600) * 1000",
        Backend::Postgres => "now() - interval '1 hour'",
    };
    env.db
        .execute(&format!(
            "update pushes set next_attempt_at = {an_hour_ago} where id = '{held}'"
        ))
        .await;

    let done = app.wait_for_status(&held, &["accepted"], 15).await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done}");
    assert_eq!(env.sends().len(), 2);
    app.stop().await;
}

async fn a_held_push_takes_its_quota_slot_when_it_is_sent(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let mut held = push_body(ANDROID_APP, "groupcast");
    held["production_mode"] = json!(true);
    held["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::hours(2)
    ));
    let view: Value = app.post_push(&held).await.json().await.unwrap();
    assert_eq!(view["status"], "awaiting_send_at");
    assert_eq!(
        app.quota_used(ANDROID_APP, "groupcast").await,
        0,
        "no slot while held"
    );
    // Withdrawn before it was due: still no slot.
    let id = view["id"].as_str().unwrap();
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 0);

    // Due now: the slot is taken when it goes out.
    held["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::seconds(1)
    ));
    held["out_biz_no"] = json!("held-2");
    let view: Value = app.post_push(&held).await.json().await.unwrap();
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 0);
    app.wait_for_status(
        view["id"].as_str().unwrap(),
        &["accepted", "queued", "sending", "done"],
        10,
    )
    .await;
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 1);
    app.stop().await;
}

async fn quota_wait_sends_first_come_first_served_across_two_replicas(backend: Backend) {
    let env = TestEnv::without_sim_quotas(backend).await;
    let a = env.spawn_app_with(fast(&env)).await;
    let b = env.spawn_app_with(fast(&env)).await;
    // Start right after a minute boundary so the first five fit in one window.
    let now = OffsetDateTime::now_utc();
    if now.second() > 45 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - now.second()))).await;
    }
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut body = push_body(ANDROID_APP, "groupcast");
        body["production_mode"] = json!(true);
        body["on_quota_exhausted"] = json!("wait");
        body["out_biz_no"] = json!(format!("wait-{i}"));
        let replica = if i % 2 == 0 { &a } else { &b };
        let view = accepted_202(replica, &body).await;
        ids.push(view["id"].as_str().unwrap().to_owned());
    }
    // Five go out in this minute; the last two wait for the next one.
    for id in &ids[..5] {
        a.wait_for_status(id, &["accepted", "queued", "sending", "done"], 10)
            .await;
    }
    // A push a claim passed over while the other replica's claim held an older one is
    // still `awaiting_send` until the next claim finds the window full.
    for id in &ids[5..] {
        let r = a.wait_for_status(id, &["awaiting_quota"], 10).await;
        assert!(r["next_attempt_at"].is_string());
    }
    assert_eq!(env.sends().len(), 5);
    assert_eq!(a.quota_used(ANDROID_APP, "groupcast").await, 5);
    let first_window: Vec<String> = env
        .sends()
        .iter()
        .filter_map(|s| s.out_biz_no.clone())
        .collect();
    for i in 0..5 {
        assert!(
            first_window.contains(&format!("wait-{i}")),
            "first come, first served: {first_window:?}"
        );
    }
    for id in &ids[5..] {
        a.wait_for_status(id, &["accepted", "queued", "sending", "done"], 75)
            .await;
    }
    assert_eq!(env.sends().len(), 7);
    assert_eq!(
        a.quota_used(ANDROID_APP, "groupcast").await,
        2,
        "the new minute counts two"
    );
    a.stop().await;
    b.stop().await;
}

async fn an_async_reject_push_still_gets_429_for_a_full_window(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let mut body = push_body(ANDROID_APP, "broadcast");
    body["production_mode"] = json!(true);
    let mut answers = Vec::new();
    for i in 0..11 {
        body["out_biz_no"] = json!(format!("b-{i}"));
        answers.push(app.post_push_async(&body).await.status().as_u16());
    }
    assert_eq!(
        answers.iter().filter(|s| **s == 202).count(),
        10,
        "{answers:?}"
    );
    assert_eq!(answers[10], 429);
    app.stop().await;
}

async fn async_fields_are_checked(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let field_of = |v: &Value| v["errors"][0]["field"].as_str().unwrap_or("").to_owned();
    let mut wait_sync = push_body(ANDROID_APP, "groupcast");
    wait_sync["on_quota_exhausted"] = json!("wait");
    let r = app.post_push(&wait_sync).await;
    assert_eq!(r.status(), 422);
    assert_eq!(field_of(&r.json().await.unwrap()), "on_quota_exhausted");

    let mut far = push_body(ANDROID_APP, "unicast");
    far["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::days(400)
    ));
    let r = app.post_push(&far).await;
    assert_eq!(r.status(), 422);
    assert_eq!(field_of(&r.json().await.unwrap()), "send_at");

    let mut bad = push_body(ANDROID_APP, "unicast");
    bad["send_at"] = json!("tomorrow at nine");
    let r = app.post_push(&bad).await;
    assert_eq!(r.status(), 422);
    assert_eq!(field_of(&r.json().await.unwrap()), "send_at");

    let mut both = push_body(ANDROID_APP, "groupcast");
    both["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::hours(1)
    ));
    both["policy"] =
        json!({"start_time": rfc3339(OffsetDateTime::now_utc() + time::Duration::hours(1))});
    let r = app.post_push(&both).await;
    assert_eq!(r.status(), 422);

    let mut unknown_mode = push_body(ANDROID_APP, "groupcast");
    unknown_mode["on_quota_exhausted"] = json!("queue");
    let r = app.post_push_async(&unknown_mode).await;
    assert_eq!(r.status(), 422);
    assert!(env.sends().is_empty());
    app.stop().await;
}

async fn history_finds_waiting_pushes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut quiet = fast(&env);
    quiet.delivery.enabled = false;
    let app = env.spawn_app_with(quiet).await;
    accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
    let mut held = push_body(ANDROID_APP, "unicast");
    held["send_at"] = json!(rfc3339(
        OffsetDateTime::now_utc() + time::Duration::hours(1)
    ));
    let r = app.post_push(&held).await;
    assert_eq!(r.status(), 202);
    for (state, n) in [
        ("awaiting_send", 1),
        ("awaiting_send_at", 1),
        ("awaiting_quota", 0),
    ] {
        let page = app.get_json(&format!("/v1/pushes?status={state}")).await;
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), n, "{state}: {page}");
        if n > 0 {
            assert_eq!(items[0]["delivery"], "async");
        }
    }
    let page = app.get_json("/v1/pushes?status=awaiting_send_at").await;
    assert!(page["items"][0]["send_at"].is_string(), "{page}");
    app.stop().await;
}

async fn async_pushes_wait_while_the_breaker_is_open(backend: Backend) {
    let (env, proxy) = TestEnv::with_proxy(backend).await;
    let mut s = fast(&env);
    s.umeng.breaker_failures = 2;
    s.umeng.breaker_cooldown_secs = 1;
    let app = env.spawn_app_with(s).await;
    proxy.refuse().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let view = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
        ids.push(view["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Refused calls open the breaker: a few attempts, not a hot loop.
    let mut tried = 0;
    for id in &ids {
        let r = app.get_json(&format!("/v1/pushes/{id}")).await;
        // Waiting, or out as the half-open breaker's probe this very moment.
        assert!(
            r["status"] == "awaiting_send" || r["status"] == "pending",
            "{r}"
        );
        tried += r["attempts"].as_array().unwrap().len();
    }
    assert!((2..=12).contains(&tried), "{tried} calls in 3 s");
    proxy.resume().await;
    for id in &ids {
        let done = app.wait_for_status(id, &["accepted"], 20).await;
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.last().unwrap()["outcome"], "accepted", "{done}");
    }
    assert_eq!(env.sends().len(), 3, "each delivered once");
    app.stop().await;
}

async fn an_async_filecast_uploads_its_lines_then_sends_and_forgets_them(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    // The first upload sends nothing: the worker retries it later, then sends.
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/upload".into()),
        kind: FaultKind::HttpStatus { status: 503 },
        times: Some(1),
    });
    let view = accepted_202(&app, &push_body(ANDROID_APP, "filecast")).await;
    let id = view["id"].as_str().unwrap();
    let done = app
        .wait_for_status(id, &["accepted", "queued", "sending", "done"], 20)
        .await;
    assert!(done["file_id"].is_string(), "{done}");
    let calls: Vec<(&str, &str)> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["call"].as_str().unwrap(), a["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(calls.first(), Some(&("upload", "unknown")), "{done}");
    assert_eq!(calls.last(), Some(&("send", "accepted")), "{done}");
    assert_eq!(env.sends().len(), 1);
    // The token file is kept only until the push is final.
    let left = env
        .db
        .query_i64(&format!(
            "select count(*) from pushes where id = '{id}' and outbox is not null"
        ))
        .await;
    assert_eq!(left, 0, "the outbox is dropped once the push is final");
    app.stop().await;
}

async fn an_app_at_its_concurrency_limit_does_not_stall_the_worker(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut s = fast(&env);
    // One push at a time per app, and a long idle poll: only the end of a delivery may
    // start the next one while the other app (iOS) has nothing due.
    s.delivery.per_app_concurrency = 1;
    s.delivery.interval_ms = 20_000;
    let app = env.spawn_app_with(s).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let view = accepted_202(&app, &push_body(ANDROID_APP, "unicast")).await;
        ids.push(view["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        app.wait_for_status(id, &["accepted"], 8).await;
    }
    assert_eq!(env.sends().len(), 5);
    app.stop().await;
}
