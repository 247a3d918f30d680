//! A corpus of malformed and hostile requests against a running gateway: zero 5xx, zero
//! panics (a panic would drop the connection), every 4xx is problem+json, every 422 lists
//! its fields, and the field at fault is named where one is.

use serde_json::{json, Value};

use super::{answer, Answer};
use crate::app::*;

on_both_backends!(hostile_corpus_gets_only_clean_4xx_or_success);

const BODY_LIMIT: usize = 256 * 1024;

const HOSTILE: [&str; 8] = [
    "'; drop table pushes; --",
    "<script>alert(1)</script>",
    "\u{0}",
    "a\u{0}b",
    "${jndi:ldap://127.0.0.1/x}",
    "../../etc/passwd",
    "\u{202e}\u{feff}\u{1F600}\u{0007}",
    "\" OR 1=1 --",
];

/// (name, raw body, field expected in `errors` when 422).
type Case = (String, Vec<u8>, Option<&'static str>);

fn raw(name: &str, bytes: impl Into<Vec<u8>>) -> Case {
    (name.to_string(), bytes.into(), None)
}

fn js(name: &str, v: &Value, field: Option<&'static str>) -> Case {
    (name.to_string(), serde_json::to_vec(v).unwrap(), field)
}

fn with(path: &[&str], value: Value, base: &Value) -> Value {
    let mut v = base.clone();
    let mut cur = &mut v;
    for (i, p) in path.iter().enumerate() {
        if i + 1 == path.len() {
            cur[*p] = value.clone();
        } else {
            if !cur[*p].is_object() {
                cur[*p] = json!({});
            }
            cur = &mut cur[*p];
        }
    }
    v
}

fn corpus() -> Vec<Case> {
    let uni = push_body(ANDROID_APP, "unicast");
    let mut c: Vec<Case> = vec![
        raw("empty", ""),
        raw("truncated", "{\"app\":"),
        raw("not json", "{not json"),
        raw("array", "[]"),
        raw("number", "1"),
        raw("string", "\"push\""),
        raw("null", "null"),
        raw("huge number", "{\"app\": 1e999999}"),
        raw("trailing garbage", "{} {}"),
        raw("bom", "\u{feff}{}"),
        raw("invalid utf-8", b"{\"app\":\"\xff\xfe\xfd\"}".to_vec()),
        raw(
            "invalid utf-8 in title",
            [
                &b"{\"app\":\"test-android\",\"type\":\"unicast\",\"notification\":{\"title\":\""[..],
                b"\xc3\x28",
                b"\",\"text\":\"x\"}}",
            ]
            .concat(),
        ),
        raw("lone surrogate escape", "{\"app\":\"\\ud800\"}"),
        raw("deep arrays", "[".repeat(10_000) + &"]".repeat(10_000)),
        raw(
            "deep objects",
            "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000),
        ),
        raw(
            "deep nesting inside extra",
            format!(
                "{{\"app\":\"test-android\",\"type\":\"unicast\",\"device_tokens\":[\"{ANDROID_TOKEN}\"],\"notification\":{{\"title\":\"t\",\"text\":\"t\",\"extra\":{{\"k\":{}1{}}}}}}}",
                "[".repeat(5_000),
                "]".repeat(5_000)
            ),
        ),
        raw("over the body limit", vec![b' '; BODY_LIMIT + 1]),
        raw(
            "huge string over the body limit",
            format!("{{\"app\":\"{}\"}}", "a".repeat(BODY_LIMIT)),
        ),
    ];
    // Wrong types, field by field.
    let wrong: [(&[&str], Value, &str); 16] = [
        (&["app"], json!(1), "app"),
        (&["type"], json!("megacast"), "type"),
        (&["type"], json!(["unicast"]), "type"),
        (&["device_tokens"], json!("tok"), "device_tokens"),
        (&["device_tokens"], json!([1, 2]), "device_tokens"),
        (&["notification"], json!("hi"), "notification"),
        (
            &["notification", "title"],
            json!({"x": 1}),
            "notification.title",
        ),
        (&["notification", "badge"], json!([1]), "notification.badge"),
        (&["notification", "extra"], json!([1]), "notification.extra"),
        (&["production_mode"], json!("yes"), "production_mode"),
        (
            &["policy", "max_send_num"],
            json!("1000"),
            "policy.max_send_num",
        ),
        (&["policy", "start_time"], json!(12), "policy.start_time"),
        (&["out_biz_no"], json!(42), "out_biz_no"),
        (&["callback_params"], json!("x"), "callback_params"),
        (&["android", "builder_id"], json!(1.5), "android.builder_id"),
        (&["umeng"], json!([]), "umeng"),
    ];
    for (path, value, field) in wrong {
        c.push(js(
            &format!("wrong type {}", path.join(".")),
            &with(path, value, &uni),
            Some(field),
        ));
    }
    // Unknown fields, top level and nested.
    c.push(js("unknown top", &with(&["titel"], json!("x"), &uni), None));
    // Found by cargo fuzz: an unknown field named "" gave a 422 with an empty field name.
    c.push(js(
        "empty field name",
        &with(&[""], json!("a"), &uni),
        Some("(body)"),
    ));
    c.push(js(
        "unknown nested",
        &with(&["notification", "colour"], json!("red"), &uni),
        Some("notification"),
    ));
    c.push(js(
        "unknown in policy",
        &with(&["policy", "retry"], json!(3), &uni),
        Some("policy"),
    ));
    // Sizes.
    c.push(js(
        "1001 tokens (more than delivery.max_audience)",
        &with(
            &["device_tokens"],
            json!(vec![ANDROID_TOKEN; 1001]),
            &push_body(ANDROID_APP, "listcast"),
        ),
        Some("device_tokens"),
    ));
    c.push(js(
        "1001 aliases (more than delivery.max_audience)",
        &with(
            &["aliases"],
            json!(vec!["u1"; 1001]),
            &push_body(ANDROID_APP, "customizedcast"),
        ),
        Some("aliases"),
    ));
    c.push(js(
        "oversize payload",
        &with(&["notification", "text"], json!("x".repeat(5000)), &uni),
        None,
    ));
    c.push(js(
        "very long out_biz_no",
        &with(&["out_biz_no"], json!("k".repeat(100_000)), &uni),
        Some("out_biz_no"),
    ));
    c.push(js(
        "very long device token",
        &with(&["device_tokens"], json!(["t".repeat(100_000)]), &uni),
        Some("device_tokens"),
    ));
    c.push(js(
        "very long app",
        &with(&["app"], json!("a".repeat(100_000)), &uni),
        Some("app"),
    ));
    c.push(js(
        "very long description",
        &with(&["description"], json!("d".repeat(100_000)), &uni),
        None,
    ));
    // Hostile strings in every text field.
    let text_fields: [(&[&str], Value); 16] = [
        (&["app"], uni.clone()),
        (&["type"], uni.clone()),
        (&["notification", "title"], uni.clone()),
        (&["notification", "text"], uni.clone()),
        (&["notification", "ticker"], uni.clone()),
        (&["notification", "sound"], uni.clone()),
        (&["notification", "image"], uni.clone()),
        (&["notification", "open", "url"], uni.clone()),
        (&["notification", "open", "activity"], uni.clone()),
        (&["notification", "extra", "k"], uni.clone()),
        (&["description"], uni.clone()),
        (&["out_biz_no"], uni.clone()),
        (&["callback_params", "k"], uni.clone()),
        (&["policy", "expire_time"], uni.clone()),
        (&["alias_type"], push_body(ANDROID_APP, "customizedcast")),
        (&["group_id"], push_body(ANDROID_APP, "groupcast")),
    ];
    for (path, base) in &text_fields {
        for (n, h) in HOSTILE.iter().enumerate() {
            c.push(js(
                &format!("hostile {} #{n}", path.join(".")),
                &with(path, json!(h), base),
                None,
            ));
        }
    }
    for (n, h) in HOSTILE.iter().enumerate() {
        c.push(js(
            &format!("hostile device token #{n}"),
            &with(&["device_tokens"], json!([h]), &uni),
            Some("device_tokens"),
        ));
        c.push(js(
            &format!("hostile alias #{n}"),
            &with(
                &["aliases"],
                json!([h]),
                &push_body(ANDROID_APP, "customizedcast"),
            ),
            None,
        ));
        c.push(js(
            &format!("hostile extra key #{n}"),
            &with(&["notification", "extra"], json!({ *h: "v" }), &uni),
            None,
        ));
        c.push(js(
            &format!("hostile file line #{n}"),
            &with(
                &["file_lines"],
                json!([h]),
                &push_body(ANDROID_APP, "filecast"),
            ),
            None,
        ));
        c.push(js(
            &format!("hostile raw umeng field #{n}"),
            &with(&["umeng", "description"], json!(h), &uni),
            None,
        ));
        c.push(js(
            &format!("hostile ios subtitle #{n}"),
            &with(
                &["notification", "subtitle"],
                json!(h),
                &push_body(IOS_APP, "unicast"),
            ),
            None,
        ));
    }
    c
}

fn check(name: &str, expected_field: Option<&str>, a: &Answer) {
    assert!(a.status < 500, "{name}: {a:?}");
    if a.status >= 400 {
        assert_eq!(a.content_type, "application/problem+json", "{name}: {a:?}");
        assert_eq!(a.body["status"], a.status, "{name}: {a:?}");
        assert!(a.body["title"].is_string() && a.body["type"].is_string());
    }
    if a.status == 422
        && a.body["type"]
            .as_str()
            .unwrap_or("")
            .ends_with(":validation")
    {
        let errors = a.body["errors"].as_array().expect("errors on a 422");
        assert!(!errors.is_empty(), "{name}");
        for e in errors {
            assert!(!e["field"].as_str().unwrap_or("").is_empty(), "{name}: {e}");
        }
        if let Some(f) = expected_field {
            assert!(
                errors
                    .iter()
                    .any(|e| e["field"].as_str().unwrap_or("").starts_with(f)),
                "{name}: expected a field {f}, got {}",
                a.body
            );
        }
    } else if let Some(f) = expected_field {
        panic!("{name}: expected 422 naming {f}, got {a:?}");
    }
}

async fn hostile_corpus_gets_only_clean_4xx_or_success(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut s = env.settings();
    s.server.body_limit_bytes = BODY_LIMIT;
    s.delivery.max_audience = 1000;
    let app = env.spawn_app_with(s).await;
    let corpus = corpus();
    let mut tally = std::collections::BTreeMap::<u16, usize>::new();
    for (name, bytes, field) in &corpus {
        let r = app
            .http
            .post(format!("{}/v1/pushes", app.base))
            .bearer_auth(TOKEN_SENDER)
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: no answer (a panic?): {e}"));
        let a = answer(r).await;
        check(name, *field, &a);
        *tally.entry(a.status).or_default() += 1;
        // Whatever was accepted is stored and readable, byte for byte.
        if a.status == 201 {
            let stored = app
                .get_json(&format!("/v1/pushes/{}", a.body["id"].as_str().unwrap()))
                .await;
            let mut sent: Value = serde_json::from_slice(bytes).unwrap();
            // file_lines are stored as their digest; a request over 64 KiB is shown cut.
            if let Some(lines) = sent.get("file_lines").and_then(Value::as_array) {
                let n = lines.len();
                assert_eq!(stored["request"]["file_lines"]["lines"], n, "{name}");
                sent["file_lines"] = stored["request"]["file_lines"].clone();
            }
            let cut = stored["truncated"]
                .as_array()
                .is_some_and(|t| t.iter().any(|f| f == "request"));
            if cut {
                let shown = stored["request"].as_str().expect("a cut request is text");
                assert!(shown.len() <= 64 * 1024, "{name}");
                assert!(sent.to_string().len() > 64 * 1024, "{name}");
            } else {
                assert_eq!(stored["request"], sent, "{name}");
            }
        }
    }
    // Hostile query strings and paths on the read side.
    for path in [
        "/v1/pushes?limit=abc",
        "/v1/pushes?limit=-1",
        "/v1/pushes?limit=99999999999999999999",
        "/v1/pushes?status=%27%3B%20drop%20table%20pushes%3B%20--",
        "/v1/pushes?app=%27%20or%201%3D1%20--",
        "/v1/pushes?out_biz_no=%00",
        "/v1/pushes?cursor=%27%3B%20drop%20table%20pushes%3B%20--",
        "/v1/pushes?from=%00&to=x",
        "/v1/pushes?nosuch=1",
        "/v1/pushes?msg_id=%3Cscript%3E",
        "/v1/pushes/%27%3B%20drop%20table%20pushes%3B%20--",
        "/v1/pushes/%00",
        "/v1/quotas?app=%3Cscript%3E",
        "/v1/quotas?app=%00",
        "/v1/pushes/%00/refresh",
        "/nope",
    ] {
        let a = answer(app.get(path).await).await;
        check(path, None, &a);
        *tally.entry(a.status).or_default() += 1;
    }
    // The tables are intact and the gateway still serves.
    assert_eq!(app.get("/v1/pushes").await.status(), 200);
    assert_eq!(
        app.post_push(&push_body(IOS_APP, "unicast")).await.status(),
        201
    );
    eprintln!(
        "bad input {backend:?}: {} requests, answers {tally:?}",
        corpus.len() + 16
    );
}
