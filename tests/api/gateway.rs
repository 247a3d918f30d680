//! The gateway end to end, through real HTTP, against the simulator; every case runs on
//! SQLite and on PostgreSQL.

use std::collections::HashSet;

use serde_json::{json, Value};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

on_both_backends!(
    every_type_on_both_platforms_reaches_umeng_and_history,
    quota_is_exact_across_two_instances,
    concurrent_repeats_of_one_out_biz_no_send_once,
    umeng_fail_gives_502_and_releases_the_slot,
    umeng_hang_gives_504_unknown_and_keeps_the_slot,
    unreachable_umeng_releases_the_slot,
    umeng_2050_saturates_the_window,
    validation_errors_never_reach_umeng_nor_take_quota,
    auth_is_enforced,
    history_filters_and_pagination,
    task_refresh_and_cancel,
    identical_file_lines_reuse_the_upload,
    failed_key_can_be_retried,
);

fn assert_md5_sign(sim_base: &str, r: &umeng_push_gateway::simulator::RecordedRequest) {
    use md5::Digest;
    let secret = if r.appkey.as_deref() == Some(ANDROID_KEY) {
        ANDROID_SECRET
    } else {
        IOS_SECRET
    };
    let expected = hex::encode(md5::Md5::digest(
        format!(
            "POST{}{}{}{}",
            sim_base.trim_end_matches('/'),
            r.path,
            r.body,
            secret
        )
        .as_bytes(),
    ));
    assert_eq!(
        r.sign.as_deref(),
        Some(expected.as_str()),
        "sign of {}",
        r.body
    );
}

async fn every_type_on_both_platforms_reaches_umeng_and_history(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let casts = [
        "unicast",
        "listcast",
        "broadcast",
        "groupcast",
        "filecast",
        "customizedcast",
    ];
    for app_name in [ANDROID_APP, IOS_APP] {
        for cast in casts {
            let resp = app.post_push(&push_body(app_name, cast)).await;
            let status = resp.status();
            let location = resp
                .headers()
                .get("location")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = resp.json().await.unwrap();
            assert_eq!(status, 201, "{app_name} {cast}: {body}");
            let id = body["id"].as_str().unwrap();
            assert_eq!(
                location.as_deref(),
                Some(format!("/v1/pushes/{id}").as_str())
            );
            assert_eq!(body["status"], "accepted");
            let task = matches!(cast, "broadcast" | "groupcast" | "filecast");
            let (field, prefix) = match cast {
                "unicast" => ("msg_id", "uu"),
                "listcast" => ("msg_id", "ul"),
                "customizedcast" => ("msg_id", "ua"),
                "broadcast" => ("task_id", "um"),
                "groupcast" => ("task_id", "us"),
                _ => ("task_id", "uf"),
            };
            assert!(body[field].as_str().unwrap().starts_with(prefix), "{body}");
            assert_eq!(body.get(if task { "msg_id" } else { "task_id" }), None);

            // History has it with its ids and what was sent.
            let stored = app.get_json(&format!("/v1/pushes/{id}")).await;
            assert_eq!(stored["status"], "accepted");
            assert_eq!(stored[field], body[field]);
            assert_eq!(stored["client"], "sender");
            assert_eq!(stored["cast_type"], cast);
            let sent = &stored["umeng_request"];
            assert_eq!(sent["type"], cast);
            assert_eq!(sent["production_mode"], "false");
            assert!(sent.get("sign").is_none());
            if app_name == ANDROID_APP {
                assert_eq!(sent["payload"]["body"]["title"], "Hello");
            } else {
                assert!(
                    sent["payload"]["aps"]["alert"].is_object()
                        || sent["payload"]["aps"]["alert"].is_string()
                );
            }
        }
    }
    // Every send reached the simulator with a valid signature over the exact body.
    let sends = env.sends();
    assert_eq!(sends.len(), 12);
    for r in &sends {
        assert_eq!(r.ret.as_deref(), Some("SUCCESS"), "{}", r.body);
        assert_md5_sign(&env.sim.base_url(), r);
    }
    // Two filecasts uploaded their files first.
    let uploads = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/upload")
        .count();
    assert_eq!(uploads, 2);
    let page = app.get_json("/v1/pushes?limit=200").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 12);
    app.stop().await;
}

async fn quota_is_exact_across_two_instances(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let a = env.spawn_app().await;
    let b = env.spawn_app().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (http, base) = (
            if i % 2 == 0 {
                a.http.clone()
            } else {
                b.http.clone()
            },
            if i % 2 == 0 {
                a.base.clone()
            } else {
                b.base.clone()
            },
        );
        let mut body = push_body(ANDROID_APP, "groupcast");
        body["production_mode"] = json!(true);
        body["out_biz_no"] = json!(format!("gc-{i}"));
        set.spawn(async move {
            let r = http
                .post(format!("{base}/v1/pushes"))
                .bearer_auth(TOKEN_SENDER)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let remaining = r
                .headers()
                .get("ratelimit-remaining")
                .map(|v| v.to_str().unwrap().to_string());
            (status, retry, remaining)
        });
    }
    let results = set.join_all().await;
    let created = results.iter().filter(|r| r.0 == 201).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(created, 5, "{results:?}");
    assert_eq!(limited.len(), 35, "{results:?}");
    for (_, retry, remaining) in &limited {
        let secs: i64 = retry.as_ref().expect("Retry-After on 429").parse().unwrap();
        assert!((1..=60).contains(&secs), "{secs}");
        assert_eq!(remaining.as_deref(), Some("0"));
    }
    let accepted = env
        .sends()
        .iter()
        .filter(|r| r.ret.as_deref() == Some("SUCCESS"))
        .count();
    assert_eq!(
        env.sends().len(),
        5,
        "the simulator received exactly the admitted sends"
    );
    assert_eq!(accepted, 5);
    assert_eq!(a.quota_used(ANDROID_APP, "groupcast").await, 5);
}

async fn concurrent_repeats_of_one_out_biz_no_send_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    // Slow Umeng down so that repeats arrive while the first is in flight.
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 300 },
        times: None,
    });
    let mut body = push_body(ANDROID_APP, "unicast");
    body["out_biz_no"] = json!("order-42-shipped");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (http, base, body) = (app.http.clone(), app.base.clone(), body.clone());
        set.spawn(async move {
            let r = http
                .post(format!("{base}/v1/pushes"))
                .bearer_auth(TOKEN_SENDER)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            let v: Value = r.json().await.unwrap();
            (status, replayed, v)
        });
    }
    let results = set.join_all().await;
    env.sim.clear_faults();
    assert_eq!(env.sends().len(), 1, "exactly one upstream send");
    let mut ids = HashSet::new();
    for (status, _, v) in &results {
        match status {
            201 => {
                ids.insert(v["id"].as_str().unwrap().to_string());
            }
            409 => {
                assert_eq!(v["out_biz_no"], "order-42-shipped");
                ids.insert(v["push_id"].as_str().unwrap().to_string());
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(ids.len(), 1, "every answer is about the same push");
    assert_eq!(results.iter().filter(|r| r.0 == 201 && !r.1).count(), 1);

    // Later: a replay of the stored answer, no second send.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers().get("idempotent-replayed").unwrap(), "true");
    let v: Value = r.json().await.unwrap();
    assert!(ids.contains(v["id"].as_str().unwrap()));
    assert_eq!(env.sends().len(), 1);

    // Same key, another body: refused, nothing sent.
    let mut other = body.clone();
    other["notification"]["title"] = json!("Changed");
    let r = app.post_push(&other).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["type"]
            .as_str()
            .unwrap()
            .ends_with("idempotency-mismatch"),
        "{v}"
    );
    assert_eq!(env.sends().len(), 1);
}

fn production_groupcast(key: &str) -> Value {
    let mut body = push_body(ANDROID_APP, "groupcast");
    body["production_mode"] = json!(true);
    body["out_biz_no"] = json!(key);
    body
}

async fn umeng_fail_gives_502_and_releases_the_slot(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim
        .add_fault(android_send_fails_once("2022", Some("payload too long")));
    let r = app.post_push(&production_groupcast("fail-1")).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["umeng"]["error_code"], "2022", "{v}");
    assert_eq!(
        app.quota_used(ANDROID_APP, "groupcast").await,
        0,
        "slot released"
    );
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["push_id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["error_code"], "2022");
    assert_eq!(stored["quota_refunded"], true);
}

async fn umeng_hang_gives_504_unknown_and_keeps_the_slot(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Hang,
        times: Some(1),
    });
    let r = app.post_push(&production_groupcast("hang-1")).await;
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    let stored = app
        .get_json(&format!("/v1/pushes/{}", v["push_id"].as_str().unwrap()))
        .await;
    assert_eq!(stored["status"], "unknown");
    assert_eq!(
        app.quota_used(ANDROID_APP, "groupcast").await,
        1,
        "slot kept"
    );
    // A task-class send with an unknown outcome may be retried with the same key; it
    // carries the same out_biz_no upstream, so Umeng dedupes it.
    let r = app.post_push(&production_groupcast("hang-1")).await;
    assert_eq!(r.status(), 201);
    let sends = env.sends();
    assert_eq!(sends.len(), 2);
    assert!(sends
        .iter()
        .all(|s| s.out_biz_no.as_deref() == Some("hang-1")));
}

async fn unreachable_umeng_releases_the_slot(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    // A port nobody listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    settings.umeng.base_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = env.spawn_app_with(settings).await;
    let r = app.post_push(&production_groupcast("down-1")).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["umeng"]["error_code"], "not_sent", "{v}");
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 0);
}

async fn umeng_2050_saturates_the_window(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "2050".into(),
            message: None,
        },
        times: Some(1),
    });
    let r = app.post_push(&production_groupcast("sat-1")).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        app.quota_used(ANDROID_APP, "groupcast").await,
        5,
        "window marked full"
    );
    // The next one is refused locally without calling Umeng.
    let r = app.post_push(&production_groupcast("sat-2")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(env.sends().len(), 1);
}

async fn validation_errors_never_reach_umeng_nor_take_quota(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut bad = production_groupcast("bad-1");
    bad["notification"] = json!({"text": "no title"});
    let r = app.post_push(&bad).await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
    let v: Value = r.json().await.unwrap();
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(fields.iter().any(|f| f.contains("title")), "{v}");

    // Not JSON, wrong type, unknown field, unknown app.
    let r = app.post_raw("{not json").await;
    assert_eq!(r.status(), 400);
    let mut wrong = push_body(ANDROID_APP, "unicast");
    wrong["device_tokens"] = json!("not-a-list");
    let r = app.post_push(&wrong).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["field"], "device_tokens", "{v}");
    let mut typo = push_body(ANDROID_APP, "unicast");
    typo["titel"] = json!("x");
    assert_eq!(app.post_push(&typo).await.status(), 422);
    let r = app.post_push(&push_body("no-such-app", "unicast")).await;
    assert_eq!(r.status(), 422);
    let mut too_many = push_body(ANDROID_APP, "listcast");
    // More than 500 are split into several calls, up to delivery.max_audience.
    too_many["device_tokens"] = json!(vec![ANDROID_TOKEN; 10_001]);
    assert_eq!(app.post_push(&too_many).await.status(), 422);

    assert!(
        env.sim.requests().is_empty(),
        "nothing reached the simulator"
    );
    assert_eq!(app.quota_used(ANDROID_APP, "groupcast").await, 0);
    // The key was not burned: the fixed request goes through.
    let r = app.post_push(&production_groupcast("bad-1")).await;
    assert_eq!(r.status(), 201);
}

async fn auth_is_enforced(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let body = push_body(IOS_APP, "unicast");
    let r = app
        .http
        .post(format!("{}/v1/pushes", app.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(app.post_push_as("wrong-token", &body).await.status(), 401);
    let r = app.post_push_as(TOKEN_READER, &body).await;
    assert_eq!(r.status(), 403, "reader lacks the send scope");
    let r = app.post_push_as(TOKEN_ANDROID_ONLY, &body).await;
    assert_eq!(r.status(), 403, "client not allowed on the iOS app");
    assert!(env.sim.requests().is_empty());
    // Health is open.
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The android-only client sees only android history.
    assert_eq!(app.post_push(&body).await.status(), 201);
    let page: Value = app
        .get_as(TOKEN_ANDROID_ONLY, "/v1/pushes")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    assert_eq!(
        app.get_as(TOKEN_ANDROID_ONLY, "/v1/pushes?app=test-ios")
            .await
            .status(),
        403
    );
}

async fn history_filters_and_pagination(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut body = push_body(if i % 2 == 0 { ANDROID_APP } else { IOS_APP }, "unicast");
        body["out_biz_no"] = json!(format!("h-{i}"));
        let v: Value = app.post_push(&body).await.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Pages of 3, newest first, each push exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/pushes?limit=3&cursor={c}"),
            None => "/v1/pushes?limit=3".to_string(),
        };
        let page = app.get_json(&path).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);

    let page = app.get_json("/v1/pushes?app=test-ios").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let page = app.get_json("/v1/pushes?out_biz_no=h-4").await;
    assert_eq!(page["items"][0]["id"], ids[4].as_str());
    let msg_id = page["items"][0]["msg_id"].as_str().unwrap().to_string();
    let page = app.get_json(&format!("/v1/pushes?msg_id={msg_id}")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let page = app.get_json("/v1/pushes?status=failed").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let page = app.get_json("/v1/pushes?client=sender&type=unicast").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    let page = app
        .get_json("/v1/pushes?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z")
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    assert_eq!(app.get("/v1/pushes?limit=201").await.status(), 422);
    assert_eq!(app.get("/v1/pushes?status=bogus").await.status(), 422);
    assert_eq!(app.get("/v1/pushes?from=yesterday").await.status(), 422);
    assert_eq!(app.get("/v1/pushes/nope").await.status(), 404);
    let r = app.get("/v1/quotas?bogus=1").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

async fn task_refresh_and_cancel(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    // A unicast cannot be refreshed or cancelled.
    let v: Value = app
        .post_push(&push_body(ANDROID_APP, "unicast"))
        .await
        .json()
        .await
        .unwrap();
    let uni = v["id"].as_str().unwrap();
    assert_eq!(
        app.post_as(TOKEN_SENDER, &format!("/v1/pushes/{uni}/cancel"))
            .await
            .status(),
        409
    );
    assert_eq!(
        app.post_as(TOKEN_SENDER, &format!("/v1/pushes/{uni}/refresh"))
            .await
            .status(),
        409
    );

    // A broadcast is cancelled while queued.
    let v: Value = app
        .post_push(&push_body(ANDROID_APP, "broadcast"))
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        app.post_as(TOKEN_READER, &format!("/v1/pushes/{id}/cancel"))
            .await
            .status(),
        403
    );
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/refresh"))
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");

    // Another one is refreshed until Umeng reports it done.
    let v: Value = app
        .post_push(&push_body(IOS_APP, "broadcast"))
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    for _ in 0..40 {
        last = app
            .post_as(TOKEN_READER, &format!("/v1/pushes/{id}/refresh"))
            .await
            .json()
            .await
            .unwrap();
        if last["status"] == "done" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(last["status"], "done", "{last}");
    assert!(last["task_status"].is_object());
    assert!(last["task_checked_at"].is_string(), "{last}");
    // Cancelling a finished task is refused by Umeng (1028) -> 409.
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 409);
}

async fn identical_file_lines_reuse_the_upload(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let body = push_body(ANDROID_APP, "filecast");
    let a: Value = app.post_push(&body).await.json().await.unwrap();
    let b: Value = app.post_push(&body).await.json().await.unwrap();
    assert_eq!(a["file_id"], b["file_id"]);
    assert!(a["file_id"].as_str().unwrap().starts_with("PF"));
    let uploads = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/upload")
        .count();
    assert_eq!(uploads, 1);
    assert_eq!(env.sends().len(), 2);
}

async fn failed_key_can_be_retried(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: None,
        kind: FaultKind::HttpStatus { status: 500 },
        times: Some(1),
    });
    let mut body = push_body(ANDROID_APP, "unicast");
    body["out_biz_no"] = json!("retry-me");
    // HTTP 500 from Umeng: outcome unknown; a unicast-class push is not re-sent blindly.
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"],
        "urn:umeng-push-gateway:problem:umeng-unclear-answer"
    );
    assert_eq!(v["push_status"], "unknown");
    assert_eq!(v["umeng"]["retryable"], false, "{v}");
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers().get("idempotent-replayed").unwrap(), "true");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:umeng-push-gateway:problem:outcome-unknown");
    assert_eq!(v["push_status"], "unknown");
    assert_eq!(env.sends().len(), 1);

    // A definite FAIL frees the key for a retry.
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "1001".into(),
            message: None,
        },
        times: Some(1),
    });
    let mut body2 = push_body(ANDROID_APP, "unicast");
    body2["out_biz_no"] = json!("retry-me-2");
    assert_eq!(app.post_push(&body2).await.status(), 502);
    let r = app.post_push(&body2).await;
    assert_eq!(r.status(), 201);
    let page = app.get_json("/v1/pushes?out_biz_no=retry-me-2").await;
    let statuses: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["accepted", "failed"],
        "both attempts are in history"
    );
}
