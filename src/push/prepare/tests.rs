//! Tests for `prepare`: one case just inside and one just outside each limit, the
//! translation for both platforms, and property tests for the fingerprint.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::umeng::model::merge_into;

fn now() -> OffsetDateTime {
    time::macros::datetime!(2026-12-01 00:00:00 UTC)
}

fn android_app() -> AppProfile {
    AppProfile {
        name: "shop-android".into(),
        platform: Platform::Android,
        payload_limit: 2048,
    }
}

fn ios_app() -> AppProfile {
    AppProfile {
        name: "shop-ios".into(),
        platform: Platform::Ios,
        payload_limit: 2012,
    }
}

fn tok(platform: Platform, i: usize) -> String {
    let s = format!("{i:0>8}");
    format!("{}{s}", "A".repeat(platform.token_len() - s.len()))
}

fn android(patch: Value) -> Value {
    let mut v = json!({
        "app": "shop-android",
        "type": "unicast",
        "device_tokens": [tok(Platform::Android, 0)],
        "notification": {"title": "t", "text": "x"}
    });
    merge_into(
        v.as_object_mut().expect("object"),
        patch.as_object().expect("object"),
    );
    v
}

fn ios(patch: Value) -> Value {
    let mut v = json!({
        "app": "shop-ios",
        "type": "unicast",
        "device_tokens": [tok(Platform::Ios, 0)],
        "notification": {"title": "t", "text": "x"}
    });
    merge_into(
        v.as_object_mut().expect("object"),
        patch.as_object().expect("object"),
    );
    v
}

fn parse(v: Value) -> PushRequest {
    serde_json::from_value(v).expect("request deserialises")
}

fn app_for(v: &Value) -> AppProfile {
    if v["app"] == json!("shop-ios") {
        ios_app()
    } else {
        android_app()
    }
}

fn ok(v: Value) -> PreparedPush {
    let app = app_for(&v);
    match prepare(&parse(v), &app, now()) {
        Ok(p) => p,
        Err(e) => panic!("expected success, got {e:?}"),
    }
}

fn err_fields(v: Value) -> Vec<String> {
    let app = app_for(&v);
    match prepare(&parse(v), &app, now()) {
        Ok(p) => panic!("expected errors, got {:?}", p.body.to_value()),
        Err(e) => e.into_iter().map(|e| e.field).collect(),
    }
}

/// The body as sent; its JSON form, built once in `prepare`, must be the same.
fn sent(p: &PreparedPush) -> Value {
    assert_eq!(p.json, p.body.to_value(), "the JSON form is the body's");
    Value::Object(p.json.clone())
}

// ---- translation ----

#[test]
fn android_unicast_translates_to_umeng() {
    let p = ok(android(json!({"out_biz_no": "order-42"})));
    assert_eq!(
        sent(&p),
        json!({
            "type": "unicast",
            "device_tokens": tok(Platform::Android, 0),
            "payload": {"display_type": "notification", "body": {"ticker": "t", "title": "t", "text": "x", "after_open": "go_app"}},
            "production_mode": "true"
        })
    );
    assert!(!p.task_class);
    assert_eq!(p.quota_kind, None);
    assert_eq!(p.out_biz_no.as_deref(), Some("order-42"));
    assert!(p.production_mode);
}

#[test]
fn json_booleans_become_umeng_strings() {
    let p = ok(android(json!({
        "production_mode": false,
        "android": {"play_sound": false, "play_vibrate": true, "mipush": true}
    })));
    let v = sent(&p);
    assert_eq!(v["production_mode"], json!("false"));
    assert_eq!(v["mipush"], json!("true"));
    assert_eq!(v["payload"]["body"]["play_sound"], json!("false"));
    assert_eq!(v["payload"]["body"]["play_vibrate"], json!("true"));
    assert!(!p.production_mode);
}

#[test]
fn ios_notification_translates_to_aps() {
    let p = ok(ios(json!({
        "notification": {"subtitle": "s", "badge": "+1", "sound": "default", "extra": {"order": 42}},
        "ios": {"interruption_level": "time-sensitive", "thread_id": "orders"},
        "policy": {"apns_collapse_id": "order-42"}
    })));
    assert_eq!(
        sent(&p)["payload"],
        json!({
            "aps": {"alert": {"title": "t", "subtitle": "s", "body": "x"}, "badge": "+1", "sound": "default",
                    "thread-id": "orders", "interruption-level": "time-sensitive"},
            "order": 42
        })
    );
    assert_eq!(sent(&p)["policy"], json!({"apns_collapse_id": "order-42"}));
}

#[test]
fn ios_message_is_a_silent_push() {
    let p = ok(ios(
        json!({"notification": null, "message": {"custom": {"sync": true}}}),
    ));
    assert_eq!(
        sent(&p)["payload"],
        json!({"aps": {"content-available": 1}, "sync": true})
    );
}

#[test]
fn android_message_is_pass_through() {
    let p = ok(android(
        json!({"notification": null, "message": {"custom": {"k": "v"}}}),
    ));
    assert_eq!(
        sent(&p)["payload"],
        json!({"display_type": "message", "body": {"custom": {"k": "v"}}})
    );
}

#[test]
fn android_open_and_badge_map_to_after_open_and_badges() {
    let p = ok(android(
        json!({"notification": {"open": {"url": "https://example.com/o/42"}, "badge": 3}}),
    ));
    let body = &sent(&p)["payload"]["body"];
    assert_eq!(body["after_open"], json!("go_url"));
    assert_eq!(body["url"], json!("https://example.com/o/42"));
    assert_eq!(body["set_badge"], json!(3));
    let p = ok(android(
        json!({"notification": {"open": {"activity": "com.x.Main"}, "badge": "+2"}}),
    ));
    assert_eq!(
        sent(&p)["payload"]["body"]["after_open"],
        json!("go_activity")
    );
    assert_eq!(sent(&p)["payload"]["body"]["add_badge"], json!(2));
    let p = ok(android(
        json!({"notification": {"open": {"custom": {"screen": "order"}}}}),
    ));
    assert_eq!(
        sent(&p)["payload"]["body"]["after_open"],
        json!("go_custom")
    );
    assert_eq!(
        err_fields(android(json!({"notification": {"badge": "-1"}}))),
        ["notification.badge"]
    );
    assert_eq!(
        err_fields(android(
            json!({"notification": {"open": {"url": "https://a.b", "app": true}}})
        )),
        ["notification.open"]
    );
}

#[test]
fn times_are_converted_to_beijing() {
    let p = ok(android(json!({
        "type": "broadcast", "device_tokens": null,
        "policy": {"start_time": "2026-12-01T09:00:00+08:00", "expire_time": "2026-12-02T01:00:00Z"}
    })));
    assert_eq!(
        sent(&p)["policy"],
        json!({"start_time": "2026-12-01 09:00:00", "expire_time": "2026-12-02 09:00:00"})
    );
    assert_eq!(
        err_fields(android(
            json!({"policy": {"expire_time": "2026-12-02 09:00:00"}})
        )),
        ["policy.expire_time"]
    );
}

#[test]
fn raw_umeng_fields_merge_last() {
    let p = ok(android(
        json!({"umeng": {"policy": {"in_app": true}, "thirdparty_id": "x", "payload": {"body": {"re_pop": 1}}}}),
    ));
    let v = sent(&p);
    assert_eq!(v["policy"], json!({"in_app": true}));
    assert_eq!(v["thirdparty_id"], json!("x"));
    assert_eq!(v["payload"]["body"]["re_pop"], json!(1));
    // A raw field that breaks a rule is caught and named.
    let fields = err_fields(android(
        json!({"umeng": {"payload": {"body": {"after_open": "go_url"}}}}),
    ));
    assert_eq!(fields, ["notification.open.url"]);
    assert_eq!(
        err_fields(android(json!({"umeng": {"appkey": "x"}}))),
        ["umeng.appkey"]
    );
}

#[test]
fn raw_fields_cannot_change_the_classification() {
    // The review's repro: a test-mode unicast dressed up as a production broadcast.
    // (`android()` merges its patch, which would drop nulls: set `umeng` directly.)
    let with_raw = |mut v: Value, raw: Value| {
        v["umeng"] = raw;
        v
    };
    let fields = err_fields(with_raw(
        android(json!({"production_mode": false})),
        json!({"type": "broadcast", "device_tokens": null, "production_mode": "true"}),
    ));
    assert_eq!(
        fields,
        ["umeng.type", "umeng.production_mode", "umeng.device_tokens"]
    );
    // A customizedcast by alias cannot become a file send (outside the 300/h bucket).
    let fields = err_fields(with_raw(
        android(json!({
            "type": "customizedcast", "device_tokens": null, "alias_type": "uid", "aliases": ["u1"]
        })),
        json!({"alias": null, "file_id": "PF1"}),
    ));
    assert_eq!(fields, ["umeng.alias", "umeng.file_id"]);
    for (raw, field) in [
        (json!({"alias_type": "x"}), "umeng.alias_type"),
        (
            json!({"filter": {"where": {"and": [{"tag": "a"}]}}}),
            "umeng.filter",
        ),
        (json!({"group_id": "g"}), "umeng.group_id"),
        (json!({"timestamp": "1"}), "umeng.timestamp"),
        (json!({"sign": "x"}), "umeng.sign"),
        (
            json!({"policy": {"out_biz_no": "other"}}),
            "umeng.policy.out_biz_no",
        ),
        (
            json!({"policy": {"start_time": "2026-12-02 09:00:00"}}),
            "umeng.policy.start_time",
        ),
        (
            json!({"policy": {"expire_time": null}}),
            "umeng.policy.expire_time",
        ),
        (json!({"policy": null}), "umeng.policy"),
    ] {
        assert_eq!(
            err_fields(with_raw(android(json!({})), raw.clone())),
            [field],
            "{raw}"
        );
    }
    let errors = prepare(
        &parse(android(json!({"umeng": {"type": "broadcast"}}))),
        &android_app(),
        now(),
    )
    .expect_err("refused");
    assert!(
        errors[0].message.contains("use the request's type"),
        "{errors:?}"
    );
    // Fields the API does not model still pass.
    ok(android(
        json!({"umeng": {"policy": {"in_app": true}, "thirdparty_id": "x"}}),
    ));
}

#[test]
fn free_text_and_free_json_fields_are_bounded() {
    let b = |len: usize| json!({"description": "d".repeat(len)});
    ok(android(b(MAX_DESCRIPTION_BYTES)));
    assert_eq!(
        err_fields(android(b(MAX_DESCRIPTION_BYTES + 1))),
        ["description"]
    );

    // An object {"k": "vvv…"} of exactly `len` bytes as compact JSON.
    let sized = |len: usize| json!({"k": "v".repeat(len - r#"{"k":""}"#.len())});
    let cb = |len: usize| json!({"callback_params": sized(len)});
    ok(android(cb(MAX_CALLBACK_PARAMS_BYTES)));
    assert_eq!(
        err_fields(android(cb(MAX_CALLBACK_PARAMS_BYTES + 1))),
        ["callback_params"]
    );

    let raw = |len: usize| json!({"umeng": sized(len)});
    ok(android(raw(MAX_RAW_UMENG_BYTES)));
    assert_eq!(err_fields(android(raw(MAX_RAW_UMENG_BYTES + 1))), ["umeng"]);

    let props = |len: usize| json!({"android": {"channel_properties": sized(len)}});
    ok(android(props(MAX_PROPERTIES_BYTES)));
    assert_eq!(
        err_fields(android(props(MAX_PROPERTIES_BYTES + 1))),
        ["android.channel_properties"]
    );
    let local = json!({"android": {"local_properties": {"k": "v".repeat(MAX_PROPERTIES_BYTES)}}});
    assert_eq!(err_fields(android(local)), ["android.local_properties"]);
    let mi = |len: usize| json!({"android": {"mi_activity": "a".repeat(len)}});
    ok(android(mi(MAX_MI_ACTIVITY_BYTES)));
    assert_eq!(
        err_fields(android(mi(MAX_MI_ACTIVITY_BYTES + 1))),
        ["android.mi_activity"]
    );

    let alias = |alias_type: usize, alias: usize| {
        android(json!({"type": "customizedcast", "device_tokens": null,
                       "alias_type": "t".repeat(alias_type), "aliases": ["a".repeat(alias)]}))
    };
    ok(alias(MAX_NAME_BYTES, MAX_NAME_BYTES));
    assert_eq!(err_fields(alias(MAX_NAME_BYTES + 1, 1)), ["alias_type"]);
    assert_eq!(err_fields(alias(1, MAX_NAME_BYTES + 1)), ["aliases[0]"]);
    let by_file = |len: usize| {
        android(
            json!({"type": "customizedcast", "device_tokens": null, "alias_type": "uid",
                       "file_lines": ["u1", "a".repeat(len)]}),
        )
    };
    ok(by_file(MAX_NAME_BYTES));
    assert_eq!(err_fields(by_file(MAX_NAME_BYTES + 1)), ["file_lines[1]"]);
    let group = |len: usize| {
        android(json!({"type": "groupcast", "device_tokens": null, "group_id": "g".repeat(len)}))
    };
    ok(group(MAX_NAME_BYTES));
    assert_eq!(err_fields(group(MAX_NAME_BYTES + 1)), ["group_id"]);
    let file = |len: usize| {
        android(json!({"type": "filecast", "device_tokens": null, "file_id": "P".repeat(len)}))
    };
    ok(file(MAX_NAME_BYTES));
    assert_eq!(err_fields(file(MAX_NAME_BYTES + 1)), ["file_id"]);
}

#[test]
fn notification_text_is_bounded_by_the_payload_limit() {
    // Every notification string is inside the payload: an 11 MB title is a payload error.
    for base in [android(json!({})), ios(json!({}))] {
        for key in ["title", "text", "sound"] {
            let mut v = base.clone();
            v["notification"][key] = json!("x".repeat(100_000));
            assert_eq!(err_fields(v), ["notification"], "{key}");
        }
    }
    let mut v = android(json!({}));
    v["notification"]["extra"] = json!({"k": "x".repeat(100_000)});
    assert_eq!(err_fields(v), ["notification"]);
}

#[test]
fn ios_groupcast_needs_a_filter() {
    assert_eq!(
        err_fields(ios(
            json!({"type": "groupcast", "device_tokens": null, "group_id": "g1"})
        )),
        ["group_id"]
    );
    assert_eq!(
        err_fields(ios(json!({"type": "groupcast", "device_tokens": null}))),
        ["filter"]
    );
    let p = ok(ios(json!({"type": "groupcast", "device_tokens": null,
                          "filter": {"where": {"and": [{"tag": "a"}]}}})));
    assert_eq!(p.quota_kind, Some(QuotaKind::Groupcast));
    let p = ok(android(
        json!({"type": "groupcast", "device_tokens": null, "group_id": "g1"}),
    ));
    assert_eq!(sent(&p)["group_id"], json!("g1"));
}

#[test]
fn android_extra_takes_string_values_only() {
    let mut v = android(json!({}));
    v["notification"]["extra"] =
        json!({"s": "ok", "n": 1, "b": true, "o": {"k": "v"}, "a": ["x"], "z": null});
    let fields = err_fields(v);
    assert_eq!(
        fields,
        [
            "notification.extra.n",
            "notification.extra.b",
            "notification.extra.o",
            "notification.extra.a",
            "notification.extra.z"
        ]
    );
    let p = ok(android(json!({"notification": {"extra": {"order": "42"}}})));
    assert_eq!(sent(&p)["payload"]["extra"], json!({"order": "42"}));
    // iOS custom keys take any JSON.
    let p = ok(ios(
        json!({"notification": {"extra": {"n": 1, "o": {"k": [true, null]}}}}),
    ));
    assert_eq!(sent(&p)["payload"]["o"], json!({"k": [true, null]}));
}

#[test]
fn policy_in_app_is_android_only() {
    ok(android(json!({"umeng": {"policy": {"in_app": true}}})));
    assert_eq!(
        err_fields(ios(json!({"umeng": {"policy": {"in_app": true}}}))),
        ["umeng.policy.in_app"]
    );
}

// ---- audiences ----

#[test]
fn listcast_takes_500_tokens_not_501() {
    let list = |n: usize| {
        (0..n)
            .map(|i| tok(Platform::Android, i))
            .collect::<Vec<_>>()
    };
    ok(android(
        json!({"type": "listcast", "device_tokens": list(500)}),
    ));
    assert_eq!(
        err_fields(android(
            json!({"type": "listcast", "device_tokens": list(501)})
        )),
        ["device_tokens"]
    );
}

#[test]
fn unicast_takes_exactly_one_token() {
    let two = [tok(Platform::Android, 0), tok(Platform::Android, 1)];
    assert_eq!(
        err_fields(android(json!({"device_tokens": two}))),
        ["device_tokens"]
    );
    assert_eq!(
        err_fields(android(json!({"device_tokens": []}))),
        ["device_tokens"]
    );
}

#[test]
fn token_lengths_are_checked_per_item_and_platform() {
    let mut list: Vec<String> = (0..5).map(|i| tok(Platform::Android, i)).collect();
    list[3] = "A".repeat(43);
    assert_eq!(
        err_fields(android(json!({"type": "listcast", "device_tokens": list}))),
        ["device_tokens[3]"]
    );
    assert_eq!(
        err_fields(ios(json!({"device_tokens": [tok(Platform::Android, 0)]}))),
        ["device_tokens[0]"]
    );
    let comma = format!("{},x", "A".repeat(42));
    assert_eq!(
        err_fields(android(json!({"device_tokens": [comma]}))),
        ["device_tokens[0]"]
    );
}

#[test]
fn aliases_take_500_not_501() {
    let list = |n: usize| (0..n).map(|i| format!("u{i}")).collect::<Vec<_>>();
    let base = json!({"type": "customizedcast", "device_tokens": null, "alias_type": "uid"});
    let with = |n: usize| {
        let mut v = android(base.clone());
        v["aliases"] = json!(list(n));
        v
    };
    let p = ok(with(500));
    assert_eq!(p.quota_kind, None);
    assert!(!p.task_class);
    assert_eq!(err_fields(with(501)), ["aliases"]);
    assert_eq!(
        err_fields(android(
            json!({"type": "customizedcast", "device_tokens": null, "aliases": ["u1"]})
        )),
        ["alias_type"]
    );
}

#[test]
fn groupcast_filter_rules() {
    let g = |filter: Value| {
        android(json!({"type": "groupcast", "device_tokens": null, "filter": filter}))
    };
    let f = |n: usize| json!({"where": {"and": [{"tag": "x".repeat(n)}]}});
    let p = ok(g(f(2970))); // 3000 bytes
    assert_eq!(p.quota_kind, Some(QuotaKind::Groupcast));
    assert_eq!(err_fields(g(f(2971))), ["filter"]);
    assert_eq!(
        err_fields(g(json!({"where": {"or": [{"tag": "a"}]}}))),
        ["filter.where"]
    );
    assert_eq!(
        err_fields(g(json!({"where": {"and": [{"not": [{"tag": "a"}]}]}}))),
        ["filter.where.and[0].not"]
    );
    assert_eq!(
        err_fields(g(json!({"where": {"and": [{"city": "x"}]}}))),
        ["filter.where.and[0].city"]
    );
    assert_eq!(
        err_fields(android(json!({"type": "groupcast", "device_tokens": null}))),
        ["filter"]
    );
}

#[test]
fn file_lines_are_uploaded_first() {
    let lines = [tok(Platform::Android, 0), tok(Platform::Android, 1)];
    let mut p = ok(android(
        json!({"type": "filecast", "device_tokens": null, "file_lines": lines}),
    ));
    assert_eq!(
        p.upload_content.as_deref(),
        Some(format!("{}\n{}\n", lines[0], lines[1]).as_str())
    );
    assert!(p.needs_upload());
    assert_eq!(p.quota_kind, Some(QuotaKind::Filecast));
    assert!(p.task_class);
    p.set_file_id("PF8961384936199949");
    assert_eq!(sent(&p)["file_id"], json!("PF8961384936199949"));
    assert!(!p.needs_upload());

    let p = ok(android(
        json!({"type": "customizedcast", "device_tokens": null, "alias_type": "uid", "file_lines": ["u1", "u2"]}),
    ));
    assert_eq!(p.quota_kind, Some(QuotaKind::CustomizedcastFile));
    assert!(p.task_class);

    assert_eq!(
        err_fields(android(
            json!({"type": "filecast", "device_tokens": null, "file_id": "PF1", "file_lines": [lines[0].clone()]})
        )),
        ["file_lines"]
    );
    assert_eq!(
        err_fields(android(
            json!({"type": "filecast", "device_tokens": null, "file_lines": [lines[0].clone(), "a\nb"]})
        )),
        ["file_lines[1]"]
    );
    assert_eq!(
        err_fields(android(json!({"file_lines": ["u1"]}))),
        ["file_lines"]
    );
    assert_eq!(
        err_fields(android(json!({"type": "filecast", "device_tokens": null}))),
        ["file_id"]
    );
}

#[test]
fn file_lines_limit_is_10_mib() {
    let line = tok(Platform::Android, 0); // 44 bytes + newline = 45
    let fits = MAX_UPLOAD_BYTES / 45;
    let v = |n: usize| {
        android(
            json!({"type": "filecast", "device_tokens": null, "file_lines": vec![line.clone(); n]}),
        )
    };
    ok(v(fits));
    assert_eq!(err_fields(v(fits + 1)), ["file_lines"]);
}

// ---- payload ----

fn payload_len(p: &PreparedPush) -> usize {
    serde_json::to_vec(&sent(p)["payload"]).expect("json").len()
}

#[test]
fn payload_limit_at_the_limit_and_one_byte_over_on_both_platforms() {
    for (base, limit) in [(android(json!({})), 2048), (ios(json!({})), 2012)] {
        let probe = ok(base.clone());
        let room = limit - payload_len(&probe);
        let mut at = base.clone();
        at["notification"]["text"] = json!(format!("x{}", "y".repeat(room)));
        let p = ok(at);
        assert_eq!(payload_len(&p), limit);
        let mut over = base;
        over["notification"]["text"] = json!(format!("x{}", "y".repeat(room + 1)));
        assert_eq!(err_fields(over), ["notification"]);
    }
}

#[test]
fn android_notification_rules() {
    assert_eq!(
        err_fields(android(json!({"notification": {"title": null}}))),
        ["notification.title"]
    );
    assert_eq!(
        err_fields(android(json!({"notification": {"open": {"url": ""}}}))),
        ["notification.open.url"]
    );
    assert_eq!(
        err_fields(android(
            json!({"notification": {"open": {"url": "ftp://example.com/x"}}})
        )),
        ["notification.open.url"]
    );
    assert_eq!(
        err_fields(android(json!({"notification": {"open": {"activity": ""}}}))),
        ["notification.open.activity"]
    );
    assert_eq!(
        err_fields(android(
            json!({"notification": {"image": "ftp://example.com/a.png"}})
        )),
        ["notification.image"]
    );
    assert_eq!(
        err_fields(android(json!({"notification": {"subtitle": "s"}}))),
        ["notification.subtitle"]
    );
    assert_eq!(
        err_fields(android(json!({"notification": null, "message": {}}))),
        ["message.custom"]
    );
    assert_eq!(
        err_fields(android(json!({"notification": null}))),
        ["notification"]
    );
    assert_eq!(
        err_fields(android(json!({"message": {"custom": "x"}}))),
        ["message"]
    );
    assert_eq!(
        err_fields(android(json!({"ios": {"category": "c"}}))),
        ["ios"]
    );
    assert_eq!(
        err_fields(android(json!({"android": {"big_body": "b".repeat(121)}}))),
        ["android.big_body"]
    );
    ok(android(json!({"android": {"big_body": "b".repeat(120)}})));
}

#[test]
fn ios_rules() {
    assert_eq!(
        err_fields(ios(json!({"notification": {"title": null, "text": null}}))),
        ["notification"]
    );
    ok(ios(
        json!({"notification": {"title": null, "text": null}, "ios": {"content_available": true}}),
    ));
    assert_eq!(
        err_fields(ios(json!({"notification": {"extra": {"d": 1}}}))),
        ["notification.extra.d"]
    );
    assert_eq!(
        err_fields(ios(
            json!({"notification": null, "message": {"custom": {"p": 1}}})
        )),
        ["message.custom.p"]
    );
    assert_eq!(
        err_fields(ios(json!({"ios": {"interruption_level": "loud"}}))),
        ["ios.interruption_level"]
    );
    assert_eq!(
        err_fields(ios(
            json!({"notification": {"open": {"url": "https://a.b"}}})
        )),
        ["notification.open.url"]
    );
    assert_eq!(
        err_fields(ios(json!({"android": {"mipush": true}}))),
        ["android"]
    );
}

// ---- policy ----

#[test]
fn policy_limits() {
    let b = |policy: Value| {
        android(json!({"type": "broadcast", "device_tokens": null, "policy": policy}))
    };
    ok(b(json!({"max_send_num": 1000})));
    assert_eq!(
        err_fields(b(json!({"max_send_num": 999}))),
        ["policy.max_send_num"]
    );
    ok(b(json!({"start_time": "2026-12-08T00:00:00Z"})));
    // At least five minutes ahead: time for the upload and the send.
    ok(b(json!({"start_time": "2026-12-01T00:05:00Z"})));
    assert_eq!(
        err_fields(b(json!({"start_time": "2026-12-01T00:04:59Z"}))),
        ["policy.start_time"]
    );
    assert_eq!(
        err_fields(b(json!({"start_time": "2026-12-08T00:00:01Z"}))),
        ["policy.start_time"]
    );
    assert_eq!(
        err_fields(b(json!({"start_time": "2026-11-30T23:59:59Z"}))),
        ["policy.start_time"]
    );
    assert_eq!(
        err_fields(b(
            json!({"start_time": "2026-12-02T00:00:00Z", "expire_time": "2026-12-01T12:00:00Z"})
        )),
        ["policy.expire_time"]
    );
    assert_eq!(
        err_fields(b(json!({"start_time": "tomorrow"}))),
        ["policy.start_time"]
    );
    assert_eq!(
        err_fields(android(
            json!({"policy": {"start_time": "2026-12-02T00:00:00Z"}})
        )),
        ["policy.start_time"]
    );
    let i = |id: String| ios(json!({"policy": {"apns_collapse_id": id}}));
    ok(i("c".repeat(64)));
    assert_eq!(err_fields(i("c".repeat(65))), ["policy.apns_collapse_id"]);
    assert_eq!(
        err_fields(android(json!({"policy": {"apns_collapse_id": "c"}}))),
        ["policy.apns_collapse_id"]
    );
}

#[test]
fn out_biz_no_rules_and_forwarding() {
    let p = ok(android(
        json!({"type": "broadcast", "device_tokens": null, "out_biz_no": "a".repeat(64)}),
    ));
    assert_eq!(sent(&p)["policy"]["out_biz_no"], json!("a".repeat(64)));
    assert_eq!(p.quota_kind, Some(QuotaKind::Broadcast));
    let p = ok(android(json!({"out_biz_no": "order-42:shipped.v1_a"})));
    assert_eq!(sent(&p).get("policy"), None, "not forwarded for unicast");
    assert_eq!(
        err_fields(android(json!({"out_biz_no": "a".repeat(65)}))),
        ["out_biz_no"]
    );
    assert_eq!(
        err_fields(android(json!({"out_biz_no": "a b"}))),
        ["out_biz_no"]
    );
    assert_eq!(
        err_fields(android(json!({"out_biz_no": ""}))),
        ["out_biz_no"]
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let fields = err_fields(android(json!({
        "app": "other",
        "out_biz_no": "bad key",
        "notification": {"title": null, "open": {"url": "ftp://x"}},
        "policy": {"max_send_num": 1}
    })));
    for f in [
        "app",
        "out_biz_no",
        "notification.title",
        "notification.open.url",
        "policy.max_send_num",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
    }
}

#[test]
fn unknown_fields_are_rejected() {
    let mut v = android(json!({}));
    v["tittle"] = json!("x");
    assert!(serde_json::from_value::<PushRequest>(v).is_err());
    let v = android(json!({"notification": {"titel": "x"}}));
    assert!(serde_json::from_value::<PushRequest>(v).is_err());
}

// ---- fingerprint ----

fn fp(v: Value) -> String {
    ok(v).fingerprint
}

/// The fingerprint's bytes are fixed: a stored key's fingerprint must match a replay's
/// after an upgrade. Keys sorted at every level, compact, strings escaped and non-ASCII
/// text written as serde_json writes them.
#[test]
fn the_fingerprint_is_the_sha256_of_a_fixed_canonical_form() {
    let mut body = json!({
        "z": "quote \" backslash \\ tab \t nul \u{0} 中文 \u{1F600}",
        "a": [1, -2.5, 1e300, true, null, {"y": 2, "b": 1}],
        "m": {},
    })
    .as_object()
    .expect("object")
    .clone();
    let gateway = GatewayFields {
        callback_url: Some("https://h/cb"),
        send_at: None,
        quota_wait: true,
    };
    let got = fingerprint("app-1", Some("k-1"), None, gateway, &mut body);
    let canonical = concat!(
        r#"{"app":"app-1","callback_url":"https://h/cb","on_quota_exhausted":"wait","#,
        r#""out_biz_no":"k-1","umeng":{"a":[1,-2.5,1e+300,true,null,{"b":1,"y":2}],"m":{},"#,
        "\"z\":\"quote \\\" backslash \\\\ tab \\t nul \\u0000 中文 \u{1F600}\"},",
        r#""upload_sha256":null}"#,
    );
    assert_eq!(got, hex::encode(Sha256::digest(canonical.as_bytes())));
    assert_eq!(body.len(), 3, "the body is given back");
}

#[test]
fn fingerprint_ignores_order_whitespace_and_default_production_mode() {
    let parse_str = |s: &str| -> PushRequest { serde_json::from_str(s).expect("request") };
    let a = parse_str(
        r#"{"app":"shop-android","type":"broadcast","notification":{"title":"t","text":"x"}}"#,
    );
    let b = parse_str(
        "{ \"notification\" : { \"text\":\"x\", \"title\":\"t\" },\n \"type\":\"broadcast\", \"app\":\"shop-android\", \"production_mode\": true }",
    );
    let fa = prepare(&a, &android_app(), now()).expect("a").fingerprint;
    let fb = prepare(&b, &android_app(), now()).expect("b").fingerprint;
    assert_eq!(fa, fb);
    assert_eq!(fa.len(), 64);
    let mut d = a.clone();
    d.production_mode = Some(false);
    assert_ne!(
        fa,
        prepare(&d, &android_app(), now()).expect("d").fingerprint
    );
    let mut other_app = android_app();
    other_app.name = "shop-android-2".into();
    let mut c = a.clone();
    c.app = other_app.name.clone();
    assert_ne!(fa, prepare(&c, &other_app, now()).expect("c").fingerprint);
}

#[test]
fn requests_with_the_same_umeng_body_share_a_fingerprint() {
    let key = json!({"out_biz_no": "k-1"});
    let base = fp(android(key.clone()));
    // Defaults written out: production_mode, ticker = title, open app, empty policy.
    for same in [
        json!({"production_mode": true}),
        json!({"notification": {"ticker": "t"}}),
        json!({"notification": {"open": {"app": true}}}),
        json!({"policy": {}}),
    ] {
        let mut v = android(key.clone());
        merge_into(
            v.as_object_mut().expect("object"),
            same.as_object().expect("object"),
        );
        assert_eq!(fp(v), base, "{same}");
    }
    // One instant in two offsets, and within the same second.
    let at = |t: &str| {
        fp(android(
            json!({"type": "broadcast", "device_tokens": null, "out_biz_no": "k-1",
                          "policy": {"expire_time": t}}),
        ))
    };
    assert_eq!(at("2026-12-02T01:00:00Z"), at("2026-12-02T09:00:00+08:00"));
    assert_eq!(at("2026-12-02T01:00:00Z"), at("2026-12-02T01:00:00.600Z"));
    assert_ne!(at("2026-12-02T01:00:00Z"), at("2026-12-02T01:00:01Z"));
    // Anything that changes the body, the key or the file is a different request.
    for different in [
        json!({"out_biz_no": "k-2"}),
        json!({"notification": {"ticker": "other"}}),
        json!({"description": "d"}),
        json!({"umeng": {"thirdparty_id": "x"}}),
        json!({"production_mode": false}),
    ] {
        let mut v = android(key.clone());
        merge_into(
            v.as_object_mut().expect("object"),
            different.as_object().expect("object"),
        );
        assert_ne!(fp(v), base, "{different}");
    }
    let file = |lines: Vec<String>| {
        fp(android(
            json!({"type": "filecast", "device_tokens": null, "out_biz_no": "k-1",
                          "file_lines": lines}),
        ))
    };
    let a = file(vec![tok(Platform::Android, 0)]);
    assert_eq!(a, file(vec![tok(Platform::Android, 0)]));
    assert_ne!(a, file(vec![tok(Platform::Android, 1)]));
}

/// Rebuilds every object with its keys in reverse order.
fn reverse_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, child) in m.iter().rev() {
                out.insert(k.clone(), reverse_keys(child));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(reverse_keys).collect()),
        other => other.clone(),
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-zA-Z0-9 ,:/.+\\-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop::option::of(s).boxed()
}

/// Requests of roughly the right shape with arbitrary contents.
fn arb_request() -> impl Strategy<Value = Value> {
    let token = prop_oneof!["[A-Za-z0-9]{44}", "[a-f0-9]{64}", "[A-Za-z0-9,]{0,50}"];
    let time = prop_oneof![
        Just("2026-12-02T00:00:00Z".to_owned()),
        Just("2026-12-09T00:00:00+08:00".to_owned()),
        "[0-9T:Z\\- ]{0,25}",
    ];
    let open = (opt("[a-z:/.]{0,20}"), opt("[a-z.]{0,10}"), opt(arb_json()), opt(any::<bool>()))
        .prop_map(|(url, activity, custom, app)| json!({"url": url, "activity": activity, "custom": custom, "app": app}));
    let notification = (
        opt("\\PC{0,30}"),
        opt("\\PC{0,30}"),
        opt("[a-z]{0,5}"),
        opt("[a-z]{0,5}"),
        opt(prop_oneof![any::<i64>().prop_map(Value::from), "[+\\-0-9a]{0,3}".prop_map(Value::String)]),
        opt(open),
        opt(prop::collection::btree_map("[a-z]{1,3}", arb_json(), 0..3)),
        opt("[a-z:/.]{0,20}"),
    )
        .prop_map(|(title, text, ticker, subtitle, badge, open, extra, image)| {
            json!({"title": title, "text": text, "ticker": ticker, "subtitle": subtitle, "badge": badge,
                   "open": open, "extra": extra, "image": image})
        });
    let policy = (opt(time.clone()), opt(time), opt(any::<i64>()), opt("[a-z]{0,70}"))
        .prop_map(|(s, e, m, c)| json!({"start_time": s, "expire_time": e, "max_send_num": m, "apns_collapse_id": c}));
    (
        (
            prop_oneof![Just("shop-android"), Just("shop-ios")],
            prop::sample::select(CastType::ALL.to_vec()),
            opt(prop::collection::vec(token, 0..4)),
            opt("[a-z]{0,4}"),
            opt(prop::collection::vec("[a-z,]{0,4}", 0..4)),
            opt(arb_json()),
            opt("[A-Z0-9]{0,6}"),
            opt(prop::collection::vec("[A-Za-z0-9\n]{0,45}", 0..3)),
        ),
        (
            opt(notification),
            opt(opt(arb_json()).prop_map(|c| json!({"custom": c}))),
            opt(policy),
            opt("[a-z0-9 .:\\-]{0,66}"),
            opt(any::<bool>()),
            opt(prop::collection::btree_map(
                prop_oneof![Just("payload".to_owned()), Just("policy".to_owned()), Just("x".to_owned())],
                arb_json(),
                0..2,
            )),
        ),
    )
        .prop_map(
            |((app, cast, tokens, alias_type, aliases, filter, file_id, lines), (n, m, policy, obn, pm, raw))| {
                let v = json!({
                    "app": app, "type": cast, "device_tokens": tokens, "alias_type": alias_type, "aliases": aliases,
                    "filter": filter, "file_id": file_id, "file_lines": lines, "notification": n, "message": m,
                    "policy": policy, "out_biz_no": obn, "production_mode": pm, "umeng": raw
                });
                strip_nulls_shallow(v)
            },
        )
}

/// Drops `null` members of the request object and its sub-objects (not of free JSON).
fn strip_nulls_shallow(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| match k.as_str() {
                    "notification" | "policy" | "open" => (k, strip_nulls_shallow(v)),
                    _ => (k, v),
                })
                .collect(),
        ),
        other => other,
    }
}

/// Valid requests with one part replaced by arbitrary (often still valid) content.
fn arb_mostly_valid() -> impl Strategy<Value = Value> {
    let patch = prop_oneof![
        "\\PC{1,40}".prop_map(|t| json!({"notification": {"title": t.clone(), "text": t}})),
        (0i64..100).prop_map(|b| json!({"notification": {"badge": b}})),
        "[a-z0-9.:_\\-]{1,64}".prop_map(|o| json!({"out_biz_no": o})),
        prop::collection::btree_map("[a-z]{2,6}", arb_json(), 0..4)
            .prop_map(|m| json!({"notification": {"extra": m}})),
        (1u32..(7 * 24 * 3600)).prop_map(|secs| {
            let t = now() + time::Duration::seconds(i64::from(secs));
            let t = t.format(&Rfc3339).unwrap_or_default();
            json!({"type": "broadcast", "device_tokens": null, "policy": {"start_time": t}})
        }),
        (1000i64..100_000).prop_map(|n| json!({"policy": {"max_send_num": n}})),
        Just(json!({"notification": null, "message": {"custom": {"k": "v"}}})),
        Just(json!({"production_mode": false})),
    ];
    (any::<bool>(), patch)
        .prop_map(|(is_ios, patch)| if is_ios { ios(patch) } else { android(patch) })
}

#[test]
fn nul_characters_are_refused_with_their_field() {
    let req: PushRequest = serde_json::from_value(android(json!({
        "notification": {"title": "a\u{0}b", "extra": {"k\u{0}": "v", "ok": ["x", "\u{0}"]}},
        "description": "\u{0}"
    })))
    .expect("parses");
    let errors = prepare(&req, &android_app(), now()).expect_err("refused");
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "notification.title",
        "notification.extra",
        "notification.extra.ok[1]",
        "description",
    ] {
        assert!(fields.contains(&f), "{f} in {fields:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fingerprint_is_invariant_under_key_order_and_whitespace(
        v in prop_oneof![arb_request(), arb_mostly_valid()]
    ) {
        if let Ok(a) = serde_json::from_value::<PushRequest>(v.clone()) {
            let reordered = serde_json::to_string_pretty(&reverse_keys(&v)).expect("json");
            let b: PushRequest = serde_json::from_str(&reordered).expect("same request");
            let app = app_for(&v);
            let pa = prepare(&a, &app, now()).map(|p| p.fingerprint);
            let pb = prepare(&b, &app, now()).map(|p| p.fingerprint);
            prop_assert_eq!(pa.is_ok(), pb.is_ok());
            if let (Ok(fa), Ok(fb)) = (pa, pb) {
                prop_assert_eq!(fa, fb);
            }
        }
    }

    #[test]
    fn prepare_never_panics_and_its_output_passes_umeng_validation(
        v in prop_oneof![arb_request(), arb_mostly_valid()]
    ) {
        if let Ok(req) = serde_json::from_value::<PushRequest>(v) {
            for app in [android_app(), ios_app()] {
                if let Ok(p) = prepare(&req, &app, now()) {
                    prop_assert!(umeng::validate(&p.body, app.platform, app.payload_limit, now()).is_ok());
                }
            }
        }
    }
}

#[test]
fn callback_url_is_part_of_the_fingerprint_only_when_given() {
    let base = android(json!({"out_biz_no": "k-1"}));
    let with = |url: &str| {
        let mut v = base.clone();
        v["callback_url"] = json!(url);
        fp(v)
    };
    let a = with("https://hooks.example.com/a");
    assert_ne!(a, fp(base.clone()), "a callback makes another request");
    assert_ne!(a, with("https://hooks.example.com/b"));
    assert_eq!(a, with("https://hooks.example.com/a"));
}
