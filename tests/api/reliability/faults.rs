//! Upstream faults through the in-process TCP proxy: each mode gives the documented HTTP
//! status and stored state, and takes or releases the quota slot as design.md §4 says;
//! a hung upstream for one app does not stop the gateway serving the other.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umeng_push_gateway::config::QuotaSettings;
use umeng_push_gateway::quota::{QuotaLimit, WindowUnit};

use super::Answer;
use crate::app::*;
use crate::proxy::{Mode, Proxy};

on_both_backends!(
    each_proxy_mode_gives_the_documented_outcome,
    a_hung_upstream_for_one_app_does_not_block_the_other,
);

/// Umeng call timeout in these tests (kept short: hangs cost this much).
const TIMEOUT_MS: u64 = 800;

async fn setup(backend: Backend) -> (TestEnv, Proxy, TestApp) {
    let (env, proxy) = TestEnv::with_proxy(backend).await;
    let mut s = env.settings();
    s.umeng.timeout_ms = TIMEOUT_MS;
    s.umeng.connect_timeout_ms = 300;
    // One day-long groupcast window with room for every case (no minute boundary).
    for app in &mut s.apps {
        app.quotas = QuotaSettings {
            groupcast: Some(QuotaLimit {
                limit: 100,
                window: WindowUnit::Day,
            }),
            ..QuotaSettings::default()
        };
    }
    let app = env.spawn_app_with(s).await;
    (env, proxy, app)
}

fn groupcast(app: &str, key: &str) -> Value {
    let mut body = push_body(app, "groupcast");
    body["production_mode"] = json!(true);
    body["out_biz_no"] = json!(key);
    body
}

async fn stored(app: &TestApp, a: &Answer) -> Value {
    let id = a.body["push_id"]
        .as_str()
        .or_else(|| a.body["id"].as_str())
        .unwrap_or_else(|| panic!("no push id in {}", a.body));
    app.get_json(&format!("/v1/pushes/{id}")).await
}

/// Simulator receipts of `/api/send` carrying `key` as out_biz_no, and the distinct task
/// ids it answered them with.
fn receipts(env: &TestEnv, key: &str) -> (usize, Vec<String>) {
    let sends: Vec<_> = env
        .sends()
        .into_iter()
        .filter(|r| r.out_biz_no.as_deref() == Some(key))
        .collect();
    let mut ids: Vec<String> = sends.iter().filter_map(|r| r.result_id.clone()).collect();
    ids.sort();
    ids.dedup();
    (sends.len(), ids)
}

async fn each_proxy_mode_gives_the_documented_outcome(backend: Backend) {
    let (env, proxy, app) = setup(backend).await;
    let used = || app.quota_used(ANDROID_APP, "groupcast");
    let mut expected_used = 0;

    // pass: 201 accepted, slot taken.
    let a = app.send(&groupcast(ANDROID_APP, "pass-1")).await;
    assert_eq!(a.status, 201, "{a:?}");
    expected_used += 1;
    assert_eq!(used().await, expected_used);

    // delay below the timeout: still 201.
    proxy.set_mode(Mode::Delay(Duration::from_millis(TIMEOUT_MS / 3)));
    let a = app.send(&groupcast(ANDROID_APP, "delay-short")).await;
    assert_eq!(a.status, 201, "{a:?}");
    expected_used += 1;

    // Ambiguous outcomes: stored unknown, slot kept; 504 when no answer came in time, 502
    // `umeng-unclear-answer` when the connection broke without a usable answer. A
    // task-class retry with the same key goes out again with the same out_biz_no and Umeng
    // creates at most one task.
    let ambiguous = [
        (
            "delay-long",
            Mode::Delay(Duration::from_millis(TIMEOUT_MS * 2)),
            504,
        ),
        ("reset", Mode::Reset, 502),
        ("reset-after-forward", Mode::ResetAfterForward, 502),
        ("close-after-0", Mode::CloseAfter(0), 502),
        ("close-after-12", Mode::CloseAfter(12), 502),
        ("close-in-body", Mode::CloseBeforeEnd(5), 502),
    ];
    for (key, mode, status) in ambiguous {
        proxy.set_mode(mode.clone());
        let a = app.send(&groupcast(ANDROID_APP, key)).await;
        assert_eq!(a.status, status, "{key}: {a:?}");
        assert_eq!(a.content_type, "application/problem+json");
        assert_eq!(a.body["push_status"], "unknown", "{key}");
        assert_eq!(
            a.body["umeng"]["retryable"], true,
            "{key}: a keyed task may be retried"
        );
        let s = stored(&app, &a).await;
        assert_eq!(s["status"], "unknown", "{key}: {s}");
        assert_eq!(s["quota_refunded"], false, "{key}");
        expected_used += 1;
        assert_eq!(used().await, expected_used, "{key}: slot kept");

        proxy.clear();
        if mode == Mode::Delay(Duration::from_millis(TIMEOUT_MS * 2)) {
            // The late request reaches the simulator after the gateway gave up.
            tokio::time::sleep(Duration::from_millis(TIMEOUT_MS * 2)).await;
        }
        let retry = app.send(&groupcast(ANDROID_APP, key)).await;
        assert_eq!(retry.status, 201, "{key} retry: {retry:?}");
        assert!(!retry.replayed);
        let (n, tasks) = receipts(&env, key);
        assert_eq!(tasks.len(), 1, "{key}: one task upstream ({n} receipts)");
        assert_eq!(retry.body["task_id"], tasks[0].as_str(), "{key}");
        // The retry is a new attempt row, but the same logical push (Umeng dedupes it into
        // one task): the slot moves to it, and the count stays one.
        assert_eq!(
            used().await,
            expected_used,
            "{key}: retry not counted twice"
        );
        assert_eq!(stored(&app, &a).await["quota_refunded"], true, "{key}");
    }

    // A unicast with an unknown outcome is not re-sent: the repeat gets 409
    // `outcome-unknown` (not a 5xx that clients and proxies retry forever).
    proxy.set_mode(Mode::ResetAfterForward);
    let mut uni = push_body(ANDROID_APP, "unicast");
    uni["out_biz_no"] = json!("uni-reset");
    let a = app.send(&uni).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert_eq!(a.body["umeng"]["retryable"], false, "{a:?}");
    proxy.clear();
    let forwarded = proxy.forwarded();
    let again = app.send(&uni).await;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(
        again.body["type"],
        "urn:umeng-push-gateway:problem:outcome-unknown"
    );
    assert_eq!(again.body["push_id"], a.body["push_id"]);
    assert!(again.replayed);
    assert_eq!(proxy.forwarded(), forwarded, "not re-sent");

    // refuse: nothing was sent, 502 not_sent, failed, slot released; the key may be retried.
    proxy.refuse().await;
    let a = app.send(&groupcast(ANDROID_APP, "refused")).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert_eq!(a.body["umeng"]["error_code"], "not_sent", "{a:?}");
    let s = stored(&app, &a).await;
    assert_eq!(s["status"], "failed");
    assert_eq!(s["quota_refunded"], true);
    assert_eq!(used().await, expected_used, "slot released");
    proxy.resume().await;
    let a = app.send(&groupcast(ANDROID_APP, "refused")).await;
    assert_eq!(a.status, 201, "{a:?}");
    expected_used += 1;
    assert_eq!(used().await, expected_used);

    // Whatever happened, nothing is left pending and every task Umeng created is in history.
    assert_eq!(
        env.db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await,
        0
    );
    let page = app.get_json("/v1/pushes?limit=200").await;
    let history: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["task_id"].as_str().or(i["msg_id"].as_str()))
        .map(str::to_string)
        .collect();
    for r in env.sends() {
        if r.ret.as_deref() == Some("SUCCESS") && r.cast_type.as_deref() == Some("groupcast") {
            let id = r.result_id.unwrap();
            assert!(history.contains(&id), "task {id} missing from history");
        }
    }
    assert_eq!(env.db.idle_in_transaction().await, 0);
}

async fn a_hung_upstream_for_one_app_does_not_block_the_other(backend: Backend) {
    let (env, proxy, app) = setup(backend).await;
    proxy.set_mode_for(ANDROID_KEY, Mode::Hang);
    // Eight Android pushes hang upstream at the same time...
    let mut hung = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (http, base) = (app.http.clone(), app.base.clone());
        let body = groupcast(ANDROID_APP, &format!("hang-{i}"));
        hung.spawn(async move { super::send(&http, &base, &body).await });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...while iOS pushes go through, each well within the Umeng timeout.
    let started = Instant::now();
    for i in 0..10 {
        let t = Instant::now();
        let a = app.send(&groupcast(IOS_APP, &format!("ios-{i}"))).await;
        assert_eq!(a.status, 201, "{a:?}");
        assert!(
            t.elapsed() < Duration::from_millis(TIMEOUT_MS / 2),
            "an iOS push took {:?} while Android hung",
            t.elapsed()
        );
    }
    let ios_elapsed = started.elapsed();
    let answers = hung.join_all().await;
    for a in &answers {
        assert_eq!(a.status, 504, "{a:?}");
    }
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 8, "kept");
    assert_eq!(app.quota_used(IOS_APP, "groupcast").await, 10);
    // Reads work during a hang too.
    assert_eq!(app.get("/v1/quotas").await.status(), 200);
    eprintln!("10 iOS pushes in {ios_elapsed:?} while 8 Android pushes hung");
    let _ = env;
}
