//! How the gateway records and answers each kind of Umeng outcome: late answers, answers
//! that cannot be used, 2050, forgotten uploads, replays of unknown outcomes, and pushes
//! still running at shutdown. Every case runs on SQLite and on PostgreSQL.

use std::time::Duration;

use serde_json::{json, Value};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

on_both_backends!(
    a_late_umeng_answer_replaces_the_sweepers_guess,
    success_without_task_id_is_unknown_and_a_retry_finds_the_task,
    a_fast_non_umeng_answer_is_502_not_504,
    umeng_2050_answers_429_with_the_recorded_push,
    a_forgotten_reused_upload_is_uploaded_again,
    unknown_outcomes_say_whether_a_retry_is_safe,
    shutdown_waits_for_admitted_pushes,
    the_breaker_answers_503_while_umeng_is_unreachable_then_probes,
);

fn fault(path: &str, kind: FaultKind) -> Fault {
    Fault {
        appkey: None,
        path: Some(path.into()),
        kind,
        times: Some(1),
    }
}

/// POST `body` as the sender in a task of its own, so the test can act while it runs.
fn post_in_background(
    app: &TestApp,
    body: Value,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let (http, base) = (app.http.clone(), app.base.clone());
    tokio::spawn(async move {
        http.post(format!("{base}/v1/pushes"))
            .bearer_auth(TOKEN_SENDER)
            .json(&body)
            .send()
            .await
    })
}

/// Waits (up to 10 s) until a push is admitted and waiting for Umeng.
async fn wait_for_a_pending_row(env: &TestEnv) {
    for _ in 0..200 {
        let pending = env
            .db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await;
        if pending > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no push was admitted within 10 s");
}

fn production(cast: &str, key: &str) -> Value {
    let mut body = push_body(ANDROID_APP, cast);
    body["production_mode"] = json!(true);
    body["out_biz_no"] = json!(key);
    body
}

async fn a_late_umeng_answer_replaces_the_sweepers_guess(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.umeng.timeout_ms = 5000;
    settings.history.pending_timeout_secs = 60;
    let app = env.spawn_app_with(settings).await;
    env.sim
        .add_fault(fault("/api/send", FaultKind::Latency { ms: 1500 }));
    // Another replica's sweeper (a shorter pending timeout, or a skewed clock) marks the
    // row unknown while the Umeng call is still running.
    let other_replica = env.db.connect_again().await;
    let body = production("filecast", "late-1");
    let send = post_in_background(&app, body);
    wait_for_a_pending_row(&env).await;
    assert_eq!(other_replica.sweep_stale_pending(0).await.ok(), Some(1));

    let r = send.await.unwrap().unwrap();

    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["status"], "accepted", "{stored}");
    assert_eq!(stored["task_id"], v["task_id"]);
    assert_eq!(stored["file_id"], v["file_id"]);
    assert_eq!(stored["error_code"], Value::Null);
}

async fn success_without_task_id_is_unknown_and_a_retry_finds_the_task(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim.add_fault(fault(
        "/api/send",
        FaultKind::Answer {
            status: 200,
            body: r#"{"ret":"SUCCESS","data":{"msg_id":"uu0000"}}"#.into(),
        },
    ));
    let body = production("groupcast", "no-task-id");

    let r = app.post_push(&body).await;

    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"],
        "urn:umeng-push-gateway:problem:umeng-unclear-answer"
    );
    assert_eq!(v["push_status"], "unknown");
    assert_eq!(v["umeng"]["retryable"], true, "{v}");
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["push_id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["status"], "unknown");
    assert_eq!(stored["umeng_response"]["data"]["msg_id"], "uu0000");
    // The retry carries the same out_biz_no: Umeng answers with the task, and one slot is
    // counted for the one logical push.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert!(v["task_id"].as_str().unwrap().starts_with("us"), "{v}");
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 1);
}

async fn a_fast_non_umeng_answer_is_502_not_504(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    for kind in [
        FaultKind::HttpStatus { status: 503 },
        FaultKind::Answer {
            status: 200,
            body: "{not json".into(),
        },
    ] {
        env.sim.add_fault(fault("/api/send", kind));
        let r = app.post_push(&push_body(ANDROID_APP, "unicast")).await;
        assert_eq!(r.status(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["type"],
            "urn:umeng-push-gateway:problem:umeng-unclear-answer"
        );
        assert_eq!(v["umeng"]["error_code"], "unknown");
        assert_eq!(v["push_status"], "unknown");
    }
}

async fn umeng_2050_answers_429_with_the_recorded_push(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim.add_fault(fault(
        "/api/send",
        FaultKind::ErrorCode {
            code: "2050".into(),
            message: None,
        },
    ));

    let r = app.post_push(&production("groupcast", "sat-1")).await;

    assert_eq!(r.status(), 429);
    let retry_after: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["from_umeng"], true);
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["push_id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["error_code"], "2050");
    // A local 429 names no push: nothing was recorded.
    let r = app.post_push(&production("groupcast", "sat-2")).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["from_umeng"].clone(), v.get("push_id")),
        (json!(false), None)
    );
}

async fn a_forgotten_reused_upload_is_uploaded_again(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let uploads = || {
        env.sim
            .requests()
            .into_iter()
            .filter(|r| r.path == "/upload")
            .count()
    };
    let first: Value = app
        .post_push(&production("filecast", "file-1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(uploads(), 1);
    // Umeng has since dropped the file: the send with the reused file_id gets 2019.
    env.sim.add_fault(fault(
        "/api/send",
        FaultKind::ErrorCode {
            code: "2019".into(),
            message: Some("file not exist".into()),
        },
    ));

    let r = app.post_push(&production("filecast", "file-2")).await;

    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_ne!(v["file_id"], first["file_id"], "a fresh upload");
    assert_eq!(uploads(), 2);
    assert_eq!(env.sends().len(), 3);
    // Every Umeng call made for the push is on its record.
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["id"].as_str().unwrap()))
        .await;
    let calls: Vec<(u64, &str, &str, Option<&str>)> = stored["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["number"].as_u64().unwrap(),
                a["call"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["error_code"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            (1, "send", "failed", Some("2019")),
            (2, "upload", "accepted", None),
            (3, "send", "accepted", None),
        ]
    );
    let first_stored = app
        .get_json(&format!("/v1/pushes/{}", first["id"].as_str().unwrap()))
        .await;
    let first_calls: Vec<&str> = first_stored["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["call"].as_str().unwrap())
        .collect();
    assert_eq!(first_calls, ["upload", "send"]);
    // The fresh file_id is the one reused from now on.
    let third: Value = app
        .post_push(&production("filecast", "file-3"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(third["file_id"], v["file_id"]);
    assert_eq!(uploads(), 2);
    // A 2019 for a file uploaded a moment ago is Umeng's answer, not a stale record: no loop.
    env.sim.add_fault(Fault {
        times: Some(3),
        ..fault(
            "/api/send",
            FaultKind::ErrorCode {
                code: "2019".into(),
                message: None,
            },
        )
    });
    let mut fresh = production("filecast", "file-4");
    fresh["file_lines"] = json!([ANDROID_TOKEN]);
    let r = app.post_push(&fresh).await;
    assert_eq!(r.status(), 502);
    assert_eq!((uploads(), env.sends().len()), (3, 5));
}

async fn unknown_outcomes_say_whether_a_retry_is_safe(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let cases = [
        (production("groupcast", "t-key"), true),
        (push_body(ANDROID_APP, "groupcast"), false),
        (production("unicast", "u-key"), false),
    ];
    for (body, retryable) in cases {
        env.sim.add_fault(fault("/api/send", FaultKind::Hang));
        let r = app.post_push(&body).await;
        assert_eq!(r.status(), 504);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["umeng"]["retryable"], retryable, "{body}: {v}");
        assert_eq!(v["umeng"]["error_code"], "timeout");
        assert_eq!(v["push_status"], "unknown");
    }
}

async fn shutdown_waits_for_admitted_pushes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.umeng.timeout_ms = 5000;
    settings.history.pending_timeout_secs = 60;
    settings.server.shutdown_grace_secs = 1;
    let app = env.spawn_app_with(settings).await;
    env.sim
        .add_fault(fault("/api/send", FaultKind::Latency { ms: 2000 }));
    let body = production("broadcast", "at-shutdown");
    let send = post_in_background(&app, body);
    wait_for_a_pending_row(&env).await;

    app.stop().await;

    // When the instance has exited (a real process would be gone now), the push is
    // recorded with Umeng's answer...
    let count = |status: &str| {
        let sql = format!("select count(*) from pushes where status = '{status}'");
        let db = &env.db;
        async move { db.query_i64(&sql).await }
    };
    assert_eq!((count("pending").await, count("accepted").await), (0, 1));
    // ...and the caller got it.
    let r = send
        .await
        .unwrap()
        .expect("an answer, not a dropped connection");
    assert_eq!(r.status(), 201);
}

async fn the_breaker_answers_503_while_umeng_is_unreachable_then_probes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.umeng.breaker_failures = 2;
    settings.umeng.breaker_cooldown_secs = 1;
    let app = env.spawn_app_with(settings).await;
    // Two answers that are not Umeng's (a proxy's HTML 502) in a row open the breaker.
    env.sim.add_fault(Fault {
        times: Some(2),
        ..fault("/api/send", FaultKind::HttpStatus { status: 502 })
    });
    for key in ["b-1", "b-2"] {
        let r = app.post_push(&production("groupcast", key)).await;
        assert_eq!(r.status(), 502, "{key}");
    }
    let stored_before = env.db.query_i64("select count(*) from pushes").await;
    let used_before = app.quota_used(ANDROID_APP, "groupcast").await;

    let r = app.post_push(&production("groupcast", "b-3")).await;

    assert_eq!(r.status(), 503);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"],
        "urn:umeng-push-gateway:problem:umeng-unavailable"
    );
    assert_eq!(env.sends().len(), 2, "Umeng was not called");
    assert_eq!(
        env.db.query_i64("select count(*) from pushes").await,
        stored_before
    );
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, used_before);
    // After the cool-down a probe goes through; Umeng answers and the breaker closes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = app.post_push(&production("groupcast", "b-3")).await;
    assert_eq!(r.status(), 201);
    let r = app.post_push(&production("groupcast", "b-4")).await;
    assert_eq!(r.status(), 201);
}
