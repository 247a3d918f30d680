//! Input rules at the API edge: raw `umeng` fields cannot reclassify a push, numbers are
//! kept exactly or refused, iOS groupcast needs a filter, and "the same request" for
//! idempotency is the same Umeng body. Every case runs on SQLite and PostgreSQL.

use serde_json::{json, Value};

use crate::app::*;

on_both_backends!(
    raw_fields_cannot_turn_a_test_unicast_into_a_production_broadcast,
    raw_fields_cannot_turn_an_alias_send_into_a_file_send,
    numbers_beyond_exact_precision_are_refused_by_name,
    ios_groupcast_by_group_id_is_refused,
    android_extra_values_must_be_strings,
    retries_that_write_defaults_out_are_the_same_request,
    oversized_free_text_is_refused_before_anything_is_sent,
    start_time_needs_a_margin_for_the_upload_and_the_send,
);

async fn count_rows(env: &TestEnv) -> i64 {
    env.db.query_i64("select count(*) from pushes").await
}

/// Posts `body`, expects 422, and returns the fields named in `errors`.
async fn refused_fields(app: &TestApp, body: &Value) -> Vec<String> {
    let r = app.post_push(body).await;
    let status = r.status();
    let problem: Value = r.json().await.expect("problem+json");
    assert_eq!(status, 422, "{problem:#}");
    problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().expect("field").to_owned())
        .collect()
}

async fn raw_fields_cannot_turn_a_test_unicast_into_a_production_broadcast(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    // The review's repro: history said unicast/test while Umeng got a production broadcast.
    let mut body = push_body(ANDROID_APP, "unicast");
    body["umeng"] = json!({"type": "broadcast", "device_tokens": null, "production_mode": "true"});
    for _ in 0..3 {
        let fields = refused_fields(&app, &body).await;
        assert_eq!(
            fields,
            ["umeng.type", "umeng.production_mode", "umeng.device_tokens"]
        );
    }
    assert!(env.sends().is_empty(), "nothing reaches Umeng");
    assert_eq!(count_rows(&env).await, 0, "nothing is stored");
    assert_eq!(app.quota_used(ANDROID_APP, "broadcast").await, 0);
    // Without the raw fields the same push goes out as what it says it is.
    body.as_object_mut().map(|o| o.remove("umeng"));
    assert_eq!(app.post_push(&body).await.status(), 201);
    let sends = env.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].cast_type.as_deref(), Some("unicast"));
    assert_eq!(sends[0].production_mode.as_deref(), Some("false"));
    app.stop().await;
}

async fn raw_fields_cannot_turn_an_alias_send_into_a_file_send(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut body = push_body(ANDROID_APP, "customizedcast");
    body["production_mode"] = json!(true);
    body["umeng"] = json!({"alias": null, "file_id": "PF1"});
    assert_eq!(
        refused_fields(&app, &body).await,
        ["umeng.alias", "umeng.file_id"]
    );
    body["umeng"] = json!({"policy": {"out_biz_no": "elsewhere", "in_app": true}});
    assert_eq!(
        refused_fields(&app, &body).await,
        ["umeng.policy.out_biz_no"]
    );
    assert!(env.sends().is_empty());
    assert_eq!(count_rows(&env).await, 0);
    assert_eq!(app.quota_used(ANDROID_APP, "customizedcast_file").await, 0);
    app.stop().await;
}

async fn numbers_beyond_exact_precision_are_refused_by_name(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    // The review's repro: …890 went to Umeng as 1.2345678901234568e+29, and …891 with the
    // same out_biz_no was replayed as the same request.
    let body = |n: &str| {
        format!(
            r#"{{"app":"{IOS_APP}","type":"unicast","device_tokens":["{IOS_TOKEN}"],
                "notification":{{"title":"t","text":"x","extra":{{"n":{n}}}}},
                "production_mode":false,"out_biz_no":"precise-1"}}"#
        )
    };
    for n in [
        "123456789012345678901234567890",
        "123456789012345678901234567891",
        "0.12345678901234567890123",
    ] {
        let r = app.post_raw(body(n)).await;
        assert_eq!(r.status(), 422, "{n}");
        let problem: Value = r.json().await.expect("problem");
        assert_eq!(
            problem["errors"][0]["field"], "notification.extra.n",
            "{problem}"
        );
    }
    assert!(env.sends().is_empty());
    assert_eq!(count_rows(&env).await, 0);
    // Numbers that fit are sent exactly as written.
    let r = app.post_raw(body("-9223372036854775808")).await;
    assert_eq!(r.status(), 201);
    let sent: Value = serde_json::from_str(&env.sends()[0].body).expect("sent JSON");
    assert_eq!(sent["payload"]["n"], json!(i64::MIN));
    let raw = body("0.5").replace("precise-1", "precise-2");
    assert_eq!(app.post_raw(raw).await.status(), 201);
    assert!(env.sends()[1].body.contains(r#""n":0.5"#));
    app.stop().await;
}

async fn ios_groupcast_by_group_id_is_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut body = push_body(IOS_APP, "groupcast");
    body.as_object_mut().map(|o| o.remove("filter"));
    body["group_id"] = json!("grp-returning-buyers");
    assert_eq!(refused_fields(&app, &body).await, ["group_id"]);
    assert!(env.sends().is_empty());
    assert_eq!(count_rows(&env).await, 0);
    // Android keeps group_id; iOS groupcast with a filter goes out.
    let mut android = push_body(ANDROID_APP, "groupcast");
    android.as_object_mut().map(|o| o.remove("filter"));
    android["group_id"] = json!("grp-returning-buyers");
    assert_eq!(app.post_push(&android).await.status(), 201);
    assert_eq!(
        app.post_push(&push_body(IOS_APP, "groupcast"))
            .await
            .status(),
        201
    );
    assert_eq!(env.sends().len(), 2);
    app.stop().await;
}

async fn android_extra_values_must_be_strings(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut body = push_body(ANDROID_APP, "unicast");
    body["notification"]["extra"] = json!({"order": "42", "count": 3, "flags": {"vip": true}});
    assert_eq!(
        refused_fields(&app, &body).await,
        ["notification.extra.count", "notification.extra.flags"]
    );
    assert!(env.sends().is_empty());
    body["notification"]["extra"] = json!({"order": "42", "count": "3", "flags": "{\"vip\":true}"});
    assert_eq!(app.post_push(&body).await.status(), 201);
    let sent: Value = serde_json::from_str(&env.sends()[0].body).expect("sent JSON");
    assert_eq!(
        sent["payload"]["extra"],
        json!({"order": "42", "count": "3", "flags": "{\"vip\":true}"})
    );
    app.stop().await;
}

async fn retries_that_write_defaults_out_are_the_same_request(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let expire = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let expire = expire.replace_nanosecond(0).expect("whole second");
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("formats")
    };
    let mut first = push_body(ANDROID_APP, "unicast");
    first["out_biz_no"] = json!("defaults-1");
    first["policy"] = json!({"expire_time": rfc(expire)});
    let r = app.post_push(&first).await;
    assert_eq!(r.status(), 201);
    let answer: Value = r.json().await.expect("answer");

    // An SDK retry that writes defaults out and uses another offset for the same instant.
    let mut retry = first.clone();
    retry["notification"]["ticker"] = json!("Hello");
    retry["notification"]["open"] = json!({"app": true});
    retry["policy"]["expire_time"] = json!(rfc(expire.to_offset(time::macros::offset!(+8))));
    let r = app.post_push(&retry).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let replay: Value = r.json().await.expect("replay");
    assert_eq!(replay["id"], answer["id"]);

    // A different text is a different request.
    let mut other = first.clone();
    other["notification"]["text"] = json!("Other");
    assert_eq!(app.post_push(&other).await.status(), 422);
    assert_eq!(env.sends().len(), 1, "sent once");
    app.stop().await;
}

async fn oversized_free_text_is_refused_before_anything_is_sent(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    // The issue's repro: an 11 MB description was sent to Umeng and stored twice.
    let mut body = push_body(ANDROID_APP, "unicast");
    body["description"] = json!("d".repeat(11 * 1024 * 1024));
    assert_eq!(refused_fields(&app, &body).await, ["description"]);
    let mut body = push_body(ANDROID_APP, "unicast");
    body["callback_params"] = json!({"k": "v".repeat(4096)});
    body["umeng"] = json!({"thirdparty_id": "x".repeat(8192)});
    assert_eq!(
        refused_fields(&app, &body).await,
        ["callback_params", "umeng"]
    );
    assert!(env.sends().is_empty());
    assert_eq!(count_rows(&env).await, 0);
    app.stop().await;
}

async fn start_time_needs_a_margin_for_the_upload_and_the_send(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let at = |ahead: time::Duration| {
        let mut body = push_body(ANDROID_APP, "broadcast");
        let t = time::OffsetDateTime::now_utc() + ahead;
        body["policy"] = json!({"start_time": t
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats")});
        body
    };
    // The review's repro used now + 2 s, which Umeng refused (2002) after a slow send.
    assert_eq!(
        refused_fields(&app, &at(time::Duration::seconds(2))).await,
        ["policy.start_time"]
    );
    assert_eq!(
        refused_fields(&app, &at(time::Duration::minutes(4))).await,
        ["policy.start_time"]
    );
    assert!(env.sends().is_empty());
    assert_eq!(
        app.post_push(&at(time::Duration::minutes(6)))
            .await
            .status(),
        201
    );
    assert_eq!(env.sends().len(), 1);
    app.stop().await;
}
