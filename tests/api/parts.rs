//! One request, the whole audience: pushes to an app group (a part per member app, each
//! rendered for its platform) and lists longer than Umeng's 500 per call (split into
//! parts). Parent and parts, quotas all or nothing, a retry that re-sends only the parts
//! that failed, history, cancel. Every case runs on SQLite and on PostgreSQL.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use serde_json::{json, Value};
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::quota::{QuotaLimit, WindowUnit};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

on_both_backends!(
    a_group_broadcast_reaches_both_appkeys_with_platform_bodies,
    a_1200_token_listcast_becomes_three_calls,
    a_partial_failure_and_its_retry_resend_only_that_part,
    group_quota_is_all_or_nothing_across_two_replicas,
    what_cannot_fan_out_is_refused_by_name,
    an_async_group_push_is_answered_202_then_settled,
    a_group_customizedcast_sends_the_aliases_to_both_apps_and_cancel_acts_on_tasks,
    a_repeat_of_an_accepted_parent_replays_it,
    a_held_group_broadcast_takes_both_slots_when_it_is_due,
    a_held_group_broadcast_fails_whole_when_a_window_is_full_and_cancel_withdraws,
    a_waiting_group_broadcast_goes_when_both_windows_have_room,
    the_poller_follows_each_task_part,
    a_synchronous_parent_is_refused_while_the_breaker_is_open,
);

/// Test settings with the app group and a fast delivery worker.
fn fast(env: &TestEnv) -> Settings {
    env.fast_delivery(env.settings_with_group())
}

fn group_broadcast(key: &str) -> Value {
    json!({
        "app": GROUP,
        "type": "broadcast",
        "notification": {"title": "Sale", "text": "Everything half price", "extra": {"k": "v"}},
        "android": {"icon": "ic_sale"},
        "ios": {"category": "SALE"},
        "out_biz_no": key,
        "production_mode": true,
    })
}

/// Android-shaped tokens (44 characters), all distinct.
fn android_tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:0>44}")).collect()
}

/// The JSON bodies the simulator got on `/api/send`, with their appkeys.
fn sent_bodies(env: &TestEnv) -> Vec<(String, Value)> {
    env.sends()
        .into_iter()
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).expect("send body is JSON");
            (r.appkey.unwrap_or_default(), body)
        })
        .collect()
}

fn part_statuses(view: &Value) -> Vec<String> {
    view["parts"]
        .as_array()
        .unwrap_or_else(|| panic!("no parts in {view}"))
        .iter()
        .map(|p| p["status"].as_str().unwrap().to_owned())
        .collect()
}

async fn a_group_broadcast_reaches_both_appkeys_with_platform_bodies(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;

    let r = app.post_push(&group_broadcast("sale-1")).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "accepted");
    assert_eq!(view["app"], GROUP);
    assert_eq!(part_statuses(&view), ["accepted", "accepted"]);
    let parts = view["parts"].as_array().unwrap();
    assert_eq!(parts[0]["app"], ANDROID_APP);
    assert_eq!(parts[0]["platform"], "android");
    assert_eq!(parts[1]["app"], IOS_APP);
    assert_eq!(parts[0]["out_biz_no"], "sale-1/1");
    assert_eq!(parts[1]["out_biz_no"], "sale-1/2");
    assert!(parts.iter().all(|p| p["task_id"].is_string()), "{view}");

    // One call per appkey, each in its platform's shape.
    let sent = sent_bodies(&env);
    assert_eq!(sent.len(), 2);
    let android = &sent
        .iter()
        .find(|(k, _)| k == ANDROID_KEY)
        .expect("android call")
        .1;
    let ios = &sent.iter().find(|(k, _)| k == IOS_KEY).expect("ios call").1;
    assert_eq!(android["payload"]["body"]["title"], "Sale");
    assert_eq!(android["payload"]["body"]["icon"], "ic_sale");
    assert_eq!(android["payload"]["extra"]["k"], "v");
    assert!(android["payload"].get("aps").is_none(), "{android}");
    assert_eq!(ios["payload"]["aps"]["alert"]["title"], "Sale");
    assert_eq!(
        ios["payload"]["aps"]["alert"]["body"],
        "Everything half price"
    );
    assert_eq!(ios["payload"]["aps"]["category"], "SALE");
    assert_eq!(ios["payload"]["k"], "v");
    assert!(ios["payload"].get("body").is_none(), "{ios}");
    assert_eq!(android["policy"]["out_biz_no"], "sale-1/1");
    assert_eq!(ios["policy"]["out_biz_no"], "sale-1/2");

    // One broadcast slot of each member.
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 1);
    assert_eq!(app.quota_used(IOS_APP, "broadcast").await, 1);

    // History lists the parent, not its parts; a part's task_id finds the parent.
    let id = view["id"].as_str().unwrap();
    let list = app.get_json(&format!("/v1/pushes?app={GROUP}")).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["parts"], 2);
    let all = app.get_json("/v1/pushes").await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        1,
        "parts are not listed: {all}"
    );
    let task = parts[1]["task_id"].as_str().unwrap();
    let found = app.get_json(&format!("/v1/pushes?task_id={task}")).await;
    assert_eq!(found["items"][0]["id"], id, "{found}");
    let record = app.get_json(&format!("/v1/pushes/{id}")).await;
    assert_eq!(record["parts"].as_array().unwrap().len(), 2, "{record}");
    assert_eq!(record["http_status"], 201);
    // A part's own record names its parent.
    let part = app
        .get_json(&format!("/v1/pushes/{}", parts[0]["id"].as_str().unwrap()))
        .await;
    assert_eq!(part["parent_id"], id);
    assert_eq!(part["part_no"], 1);
    app.stop().await;
}

async fn a_1200_token_listcast_becomes_three_calls(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let tokens = android_tokens(1200);
    let mut body = push_body(ANDROID_APP, "listcast");
    body["device_tokens"] = json!(tokens);

    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "accepted");
    let audience: Vec<u64> = view["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["audience"].as_u64().unwrap())
        .collect();
    assert_eq!(audience, [500, 500, 200]);
    assert!(view["parts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["msg_id"].is_string()));

    let mut sizes: Vec<usize> = sent_bodies(&env)
        .iter()
        .map(|(_, b)| b["device_tokens"].as_str().unwrap().split(',').count())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [200, 500, 500]);
    // Every token went out exactly once.
    let mut sent: Vec<String> = sent_bodies(&env)
        .iter()
        .flat_map(|(_, b)| {
            b["device_tokens"]
                .as_str()
                .unwrap()
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    sent.sort();
    assert_eq!(sent, tokens);

    // A bad token deep in the list is named by its place in the caller's list.
    let mut bad = tokens.clone();
    bad[812] = "short".into();
    body["device_tokens"] = json!(bad);
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["device_tokens[812]"], "{problem}");
    app.stop().await;
}

async fn a_partial_failure_and_its_retry_resend_only_that_part(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    env.sim.add_fault(Fault {
        appkey: Some(IOS_KEY.into()),
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "2003".into(),
            message: Some("rejected".into()),
        },
        times: Some(1),
    });
    let body = group_broadcast("partial-1");

    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 207, "a partial outcome is 207 Multi-Status");
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "partial");
    assert_eq!(part_statuses(&view), ["accepted", "failed"]);
    assert_eq!(view["parts"][1]["error_code"], "2003");
    // The failed part's slot went back; the accepted one's is kept.
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 1);
    assert_eq!(app.quota_used(IOS_APP, "broadcast").await, 0);
    let record = app
        .get_json(&format!("/v1/pushes/{}", view["id"].as_str().unwrap()))
        .await;
    assert_eq!(record["error_code"], "parts_failed");
    assert_eq!(record["http_status"], 207);

    // The retry sends the failed part again, and only it.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["id"], view["id"], "the same parent");
    assert_eq!(again["status"], "accepted");
    assert_eq!(again["resent_parts"], json!([2]));
    assert_eq!(part_statuses(&again), ["accepted", "accepted"]);
    let sent = sent_bodies(&env);
    let to = |key: &str| sent.iter().filter(|(k, _)| k == key).count();
    assert_eq!(
        (to(ANDROID_KEY), to(IOS_KEY)),
        (1, 2),
        "only the iOS part again"
    );
    assert_eq!(sent[2].1["policy"]["out_biz_no"], "partial-1/2");
    assert_eq!(again["parts"][1]["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(app.quota_used(IOS_APP, "broadcast").await, 1);

    // Now everything went out: a further repeat replays.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(env.sends().len(), 3);
    app.stop().await;
}

async fn group_quota_is_all_or_nothing_across_two_replicas(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = fast(&env);
    // The iOS app has room for 2 broadcasts a day, the Android app for 3.
    settings.apps[0].quotas.broadcast = Some(QuotaLimit {
        limit: 3,
        window: WindowUnit::Day,
    });
    settings.apps[1].quotas.broadcast = Some(QuotaLimit {
        limit: 2,
        window: WindowUnit::Day,
    });
    let a = env.spawn_app_with(settings.clone()).await;
    let b = env.spawn_app_with(settings).await;

    let mut tasks = Vec::new();
    for i in 0..4 {
        let target = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        let http = a.http.clone();
        tasks.push(tokio::spawn(async move {
            http.post(format!("{target}/v1/pushes"))
                .bearer_auth(TOKEN_SENDER)
                .json(&group_broadcast(&format!("race-{i}")))
                .send()
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    let mut limited = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status().as_u16() {
            201 => created += 1,
            429 => limited.push(r.json::<Value>().await.unwrap()),
            other => panic!("unexpected {other}: {:?}", r.text().await),
        }
    }
    assert_eq!((created, limited.len()), (2, 2));
    for problem in &limited {
        assert_eq!(
            problem["app"], IOS_APP,
            "the full window is named: {problem}"
        );
    }
    // Nothing half-sent: the Android slots of the refused pushes were not taken.
    assert_eq!(a.quota_used(ANDROID_APP, "broadcast").await, 2);
    assert_eq!(a.quota_used(IOS_APP, "broadcast").await, 2);
    assert_eq!(env.sends().len(), 4);
    let list = a.get_json("/v1/pushes").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        2,
        "refusals leave no rows"
    );
    a.stop().await;
    b.stop().await;
}

async fn what_cannot_fan_out_is_refused_by_name(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let fields = |problem: &Value| -> Vec<String> {
        problem["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{problem}"))
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect()
    };
    let cases = [
        (
            json!({"app": GROUP, "type": "filecast", "file_lines": ["a"],
                "notification": {"title": "t", "text": "x"}}),
            "type",
        ),
        (
            json!({"app": GROUP, "type": "unicast", "device_tokens": [ANDROID_TOKEN],
                "notification": {"title": "t", "text": "x"}}),
            "device_tokens",
        ),
        (
            json!({"app": GROUP, "type": "groupcast", "group_id": "g1",
                "notification": {"title": "t", "text": "x"}}),
            "group_id",
        ),
        (
            json!({"app": ANDROID_APP, "type": "unicast",
                "device_tokens": {"android": [ANDROID_TOKEN]},
                "notification": {"title": "t", "text": "x"}}),
            "device_tokens",
        ),
        (
            json!({"app": ANDROID_APP, "type": "listcast", "device_tokens": android_tokens(10_001),
                "notification": {"title": "t", "text": "x"}}),
            "device_tokens",
        ),
        (
            json!({"app": GROUP, "type": "broadcast", "on_quota_exhausted": "wait",
                "notification": {"title": "t", "text": "x"}}),
            "on_quota_exhausted",
        ),
    ];
    for (body, field) in cases {
        let r = app.post_push(&body).await;
        assert_eq!(r.status(), 422, "{body}");
        let problem: Value = r.json().await.unwrap();
        assert!(
            fields(&problem).iter().any(|f| f == field),
            "{field}: {problem}"
        );
    }
    // An error in a shared field names the app whose part it broke.
    let r = app
        .post_push(&json!({"app": GROUP, "type": "broadcast", "notification": {"title": "t"}}))
        .await;
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.unwrap();
    let text = problem.to_string();
    assert!(text.contains(ANDROID_APP), "{problem}");
    // A client limited to one app may not use the group.
    let r = app
        .post_push_as(TOKEN_ANDROID_ONLY, &group_broadcast("not-mine"))
        .await;
    assert_eq!(r.status(), 403);
    assert!(env.sends().is_empty());
    app.stop().await;
}

async fn an_async_group_push_is_answered_202_then_settled(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let body = json!({
        "app": GROUP,
        "type": "unicast",
        "device_tokens": {"android": [ANDROID_TOKEN], "ios": [IOS_TOKEN]},
        "notification": {"title": "Your order", "text": "has shipped"},
        "production_mode": false,
    });
    let r = app.post_push_async(&body).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let view: Value = r.json().await.unwrap();
    let id = view["id"].as_str().unwrap().to_owned();
    let mut record = Value::Null;
    for _ in 0..200 {
        record = app.get_json(&format!("/v1/pushes/{id}")).await;
        if record["status"] != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(record["status"], "accepted", "{record}");
    assert_eq!(part_statuses(&record), ["accepted", "accepted"]);
    assert_eq!(record["platform"], "all");
    let sent = sent_bodies(&env);
    assert_eq!(sent.len(), 2);
    for (key, b) in &sent {
        let token = if key == ANDROID_KEY {
            ANDROID_TOKEN
        } else {
            IOS_TOKEN
        };
        assert_eq!(b["device_tokens"], token);
        assert_eq!(b["type"], "unicast");
    }
    app.stop().await;
}

async fn a_group_customizedcast_sends_the_aliases_to_both_apps_and_cancel_acts_on_tasks(
    backend: Backend,
) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let aliases: Vec<String> = (0..700).map(|i| format!("user-{i}")).collect();
    let body = json!({
        "app": GROUP,
        "type": "customizedcast",
        "alias_type": "user_id",
        "aliases": aliases,
        "notification": {"title": "Hi", "text": "there"},
        "production_mode": false,
    });
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let view: Value = r.json().await.unwrap();
    // 700 aliases on each app: 500 + 200 per app.
    let shape: Vec<(String, u64)> = view["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["app"].as_str().unwrap().to_owned(),
                p["audience"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (ANDROID_APP.to_owned(), 500),
            (ANDROID_APP.to_owned(), 200),
            (IOS_APP.to_owned(), 500),
            (IOS_APP.to_owned(), 200)
        ]
    );
    assert_eq!(env.sends().len(), 4);
    // Alias sends are no tasks: nothing to cancel.
    let r = app
        .post_as(
            TOKEN_SENDER,
            &format!("/v1/pushes/{}/cancel", view["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(r.status(), 409);

    // A group groupcast is two tasks; cancel cancels both.
    let r = app
        .post_push(&json!({"app": GROUP, "type": "groupcast",
            "filter": {"where": {"and": [{"tag": "vip"}]}},
            "notification": {"title": "t", "text": "x"}, "production_mode": false}))
        .await;
    assert_eq!(r.status(), 201);
    let view: Value = r.json().await.unwrap();
    let id = view["id"].as_str().unwrap();
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let record: Value = r.json().await.unwrap();
    assert_eq!(
        part_statuses(&record),
        ["cancelled", "cancelled"],
        "{record}"
    );
    let cancels = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/cancel")
        .count();
    assert_eq!(cancels, 2);
    // Refresh asks Umeng about both tasks.
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/refresh"))
        .await;
    assert_eq!(r.status(), 200);
    app.stop().await;
}

async fn a_repeat_of_an_accepted_parent_replays_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let mut body = push_body(ANDROID_APP, "listcast");
    body["device_tokens"] = json!(android_tokens(501));
    body["out_biz_no"] = json!("split-1");
    let first = app.post_push(&body).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = app.post_push(&body).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(env.sends().len(), 2);
    // The same key for a different request is refused.
    body["device_tokens"] = json!(android_tokens(502));
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 422);
    app.stop().await;
}

/// POSTs with `Prefer: respond-async`, asserting 202; returns the view.
async fn post_async(app: &TestApp, body: &Value) -> Value {
    let r = app.post_push_async(body).await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    r.json().await.unwrap()
}

fn in_secs(secs: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds(secs))
        .format(&Rfc3339)
        .unwrap()
}

/// Fills `app`'s broadcast window (limit 1) with one broadcast of its own.
async fn fill_broadcast_window(app: &TestApp, name: &str) {
    let mut body = push_body(name, "broadcast");
    body["production_mode"] = json!(true);
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

fn one_broadcast_per(settings: &mut Settings, app: usize, window: WindowUnit) {
    settings.apps[app].quotas.broadcast = Some(QuotaLimit { limit: 1, window });
}

async fn a_held_group_broadcast_takes_both_slots_when_it_is_due(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast(&env)).await;
    let mut body = group_broadcast("held-1");
    body["send_at"] = json!(in_secs(2));

    let view = post_async(&app, &body).await;
    assert_eq!(view["status"], "awaiting_send_at");
    let id = view["id"].as_str().unwrap().to_owned();
    // Held: nothing sent, no slot taken yet.
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 0);
    assert_eq!(app.quota_used(IOS_APP, "broadcast").await, 0);
    assert!(env.sends().is_empty());

    let done = app.wait_for_status(&id, &["accepted"], 15).await;
    assert_eq!(part_statuses(&done), ["accepted", "accepted"]);
    assert_eq!(env.sends().len(), 2);
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 1);
    assert_eq!(app.quota_used(IOS_APP, "broadcast").await, 1);
    // A repeat replays the parent.
    let r = app.post_push(&body).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(env.sends().len(), 2);
    app.stop().await;
}

async fn a_held_group_broadcast_fails_whole_when_a_window_is_full_and_cancel_withdraws(
    backend: Backend,
) {
    let env = TestEnv::new(backend).await;
    let mut settings = fast(&env);
    one_broadcast_per(&mut settings, 1, WindowUnit::Day);
    let app = env.spawn_app_with(settings).await;
    let mut body = group_broadcast("held-full");
    body["send_at"] = json!(in_secs(1));
    let view = post_async(&app, &body).await;
    let id = view["id"].as_str().unwrap().to_owned();
    // The iOS window fills up before the push is due.
    fill_broadcast_window(&app, IOS_APP).await;

    let done = app.wait_for_status(&id, &["failed"], 15).await;
    assert_eq!(done["error_code"], "quota_exhausted");
    assert_eq!(done["http_status"], 429);
    assert!(
        done["error_msg"].as_str().unwrap().contains(IOS_APP),
        "{done}"
    );
    // Nothing half-sent: no Android slot, no Android call.
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 0);
    assert_eq!(
        env.sends().len(),
        1,
        "only the broadcast that filled the window"
    );
    // A repeat is not a replay of that failure: the key moves to a new attempt, which
    // (its send_at now past) is judged at once: the iOS window is still full.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["app"], IOS_APP);

    // A held parent is withdrawn before it is due.
    let mut later = group_broadcast("held-cancel");
    later["send_at"] = json!(in_secs(3600));
    let view = post_async(&app, &later).await;
    let id = view["id"].as_str().unwrap();
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let record: Value = r.json().await.unwrap();
    assert_eq!(record["status"], "withdrawn");
    app.stop().await;
}

async fn a_waiting_group_broadcast_goes_when_both_windows_have_room(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = fast(&env);
    one_broadcast_per(&mut settings, 1, WindowUnit::Minute);
    one_broadcast_per(&mut settings, 0, WindowUnit::Minute);
    let a = env.spawn_app_with(settings.clone()).await;
    let b = env.spawn_app_with(settings).await;
    fill_broadcast_window(&a, IOS_APP).await;

    let mut body = group_broadcast("wait-1");
    body["on_quota_exhausted"] = json!("wait");
    let view = post_async(&a, &body).await;
    let id = view["id"].as_str().unwrap().to_owned();
    assert_eq!(view["status"], "awaiting_quota", "{view}");
    // The Android window has room, but nothing goes before both can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.quota_used(ANDROID_APP, "broadcast").await, 0);
    assert_eq!(env.sends().len(), 1);

    // The next minute both windows have room: one call per app, from one replica.
    let done = b.wait_for_status(&id, &["accepted"], 75).await;
    assert_eq!(part_statuses(&done), ["accepted", "accepted"]);
    let sent = sent_bodies(&env);
    assert_eq!(sent.len(), 3, "one broadcast per member, sent once");
    assert_eq!(sent.iter().filter(|(k, _)| k == ANDROID_KEY).count(), 1);
    assert_eq!(a.quota_used(ANDROID_APP, "broadcast").await, 1);
    assert_eq!(a.quota_used(IOS_APP, "broadcast").await, 1);
    a.stop().await;
    b.stop().await;
}

async fn the_poller_follows_each_task_part(backend: Backend) {
    let env = TestEnv::with_task_step(backend, Duration::from_millis(50)).await;
    let mut settings = fast(&env);
    settings.poller.interval_secs = 1;
    settings.poller.backoff_secs = vec![1];
    let app = env.spawn_app_with(settings).await;
    let r = app
        .post_push(&json!({"app": GROUP, "type": "groupcast",
            "filter": {"where": {"and": [{"tag": "vip"}]}},
            "notification": {"title": "t", "text": "x"}, "production_mode": false}))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut record = Value::Null;
    for _ in 0..300 {
        record = app.get_json(&format!("/v1/pushes/{id}")).await;
        if part_statuses(&record).iter().all(|s| s == "done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(part_statuses(&record), ["done", "done"], "{record}");
    // The parent keeps its send outcome; its parts carry the task states.
    assert_eq!(record["status"], "accepted");
    let polls = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/status")
        .map(|r| r.appkey.unwrap_or_default())
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(
        polls.len(),
        2,
        "each part's task is polled with its own appkey"
    );
    app.stop().await;
}

async fn a_synchronous_parent_is_refused_while_the_breaker_is_open(backend: Backend) {
    let (env, proxy) = TestEnv::with_proxy(backend).await;
    let mut s = env.settings_with_group();
    s.umeng.breaker_failures = 1;
    s.umeng.breaker_cooldown_secs = 60;
    let app = env.spawn_app_with(s).await;
    proxy.refuse().await;
    // One refused call opens the breaker.
    let r = app.post_push(&push_body(ANDROID_APP, "unicast")).await;
    assert_eq!(r.status(), 502);
    let r = app.post_push(&group_broadcast("while-down")).await;
    assert_eq!(r.status(), 503);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("umeng-unavailable"),
        "{problem}"
    );
    let list = app.get_json(&format!("/v1/pushes?app={GROUP}")).await;
    assert!(
        list["items"].as_array().unwrap().is_empty(),
        "nothing stored"
    );
    app.stop().await;
}
