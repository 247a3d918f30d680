//! Black-box tests of the Umeng simulator: raw requests signed by hand, as umeng-api.md says.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use serde_json::{json, Value};
use umeng_push_gateway::simulator::{
    self, Fault, FaultKind, SimApp, SimPlatform, SimulatorConfig, SimulatorHandle,
};

const ANDROID_KEY: &str = "5f0000000000000000000001";
const ANDROID_SECRET: &str = "testsecret0123456789abcdefghijkl";
const IOS_KEY: &str = "5f00000000000000000000i0";
const IOS_SECRET: &str = "iossecret0123456789abcdefghijklm";

struct Sim {
    handle: SimulatorHandle,
    client: reqwest::Client,
}

struct Reply {
    status: u16,
    json: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.json["data"]["error_code"].as_str().unwrap_or("")
    }

    fn ret(&self) -> &str {
        self.json["ret"].as_str().unwrap_or("")
    }

    fn data(&self, key: &str) -> String {
        self.json["data"][key].as_str().unwrap_or("").to_owned()
    }

    #[track_caller]
    fn assert_fail(&self, code: &str) {
        assert_eq!(
            (self.status, self.ret(), self.code()),
            (400, "FAIL", code),
            "{}",
            self.json
        );
    }

    #[track_caller]
    fn assert_success(&self) {
        assert_eq!((self.status, self.ret()), (200, "SUCCESS"), "{}", self.json);
    }
}

async fn spawn_sim_with(task_step: Duration, quotas: bool) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = SimulatorConfig {
        apps: vec![
            SimApp {
                appkey: ANDROID_KEY.to_owned(),
                secret: ANDROID_SECRET.to_owned(),
                platform: SimPlatform::Android,
            },
            format!("{IOS_KEY}:{IOS_SECRET}:ios").parse().expect("app"),
        ],
        task_step,
        quotas,
        ..SimulatorConfig::default()
    };
    let handle = simulator::start(listener, config).await.expect("start");
    Sim {
        handle,
        client: reqwest::Client::new(),
    }
}

async fn spawn_sim() -> Sim {
    spawn_sim_with(Duration::from_millis(100), true).await
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn ts() -> String {
    now_ms().to_string()
}

fn android_token(i: usize) -> String {
    format!("A{:043}", i)
}

fn ios_token(i: usize) -> String {
    format!("{:064x}", i)
}

fn secret_of(appkey: &str) -> &'static str {
    if appkey == IOS_KEY {
        IOS_SECRET
    } else {
        ANDROID_SECRET
    }
}

fn android_payload() -> Value {
    json!({"display_type": "notification", "body": {"title": "hi", "text": "hello", "after_open": "go_app"}})
}

fn ios_payload() -> Value {
    json!({"aps": {"alert": {"title": "hi", "body": "hello"}}, "k1": "v1"})
}

/// A send body for `appkey` with type `cast`, its targets added by the caller.
fn send_body(appkey: &str, cast: &str, production: bool) -> Value {
    let payload = if appkey == IOS_KEY {
        ios_payload()
    } else {
        android_payload()
    };
    json!({
        "appkey": appkey,
        "timestamp": ts(),
        "type": cast,
        "payload": payload,
        "production_mode": if production { "true" } else { "false" },
    })
}

fn unicast(appkey: &str) -> Value {
    let mut b = send_body(appkey, "unicast", false);
    b["device_tokens"] = json!(if appkey == IOS_KEY {
        ios_token(1)
    } else {
        android_token(1)
    });
    b
}

fn groupcast(appkey: &str, production: bool) -> Value {
    let mut b = send_body(appkey, "groupcast", production);
    b["filter"] = json!({"where": {"and": [{"tag": "test"}, {"or": [{"app_version": "1.0"}, {"not": {"channel": "360"}}]}]}});
    b
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.handle.base_url(), path)
    }

    fn sign(&self, path: &str, body: &str, secret: &str) -> String {
        md5_hex(&[
            b"POST",
            self.url(path).as_bytes(),
            body.as_bytes(),
            secret.as_bytes(),
        ])
    }

    /// POSTs `body` exactly as given with `?{query}`.
    async fn post_raw(&self, path: &str, query: &str, body: &str) -> Reply {
        let url = if query.is_empty() {
            self.url(path)
        } else {
            format!("{}?{}", self.url(path), query)
        };
        let res = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        Reply {
            status,
            json: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// Serialises `body` once, signs those bytes with the appkey's secret, sends them.
    async fn call(&self, path: &str, body: &Value) -> Reply {
        let text = body.to_string();
        let secret = secret_of(body["appkey"].as_str().unwrap_or(""));
        let sign = self.sign(path, &text, secret);
        self.post_raw(path, &format!("sign={sign}"), &text).await
    }

    async fn send(&self, body: &Value) -> Reply {
        self.call("/api/send", body).await
    }

    async fn status(&self, appkey: &str, task_id: &str) -> Reply {
        let body = json!({"appkey": appkey, "timestamp": ts(), "task_id": task_id});
        self.call("/api/status", &body).await
    }

    async fn cancel(&self, appkey: &str, task_id: &str) -> Reply {
        let body = json!({"appkey": appkey, "timestamp": ts(), "task_id": task_id});
        self.call("/api/cancel", &body).await
    }

    async fn upload(&self, appkey: &str, content: &str) -> Reply {
        let body = json!({"appkey": appkey, "timestamp": ts(), "content": content});
        self.call("/upload", &body).await
    }
}

// ---- signature and envelope (§2) ----

#[test]
fn sign_helper_reproduces_the_worked_example_of_2_3() {
    let body = r#"{"appkey":"5f0000000000000000000001","timestamp":"1700000000","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{"display_type":"notification","body":{"ticker":"hi","title":"hi","text":"hello","after_open":"go_app"}},"production_mode":"false"}"#;
    assert_eq!(body.len(), 283);
    let sign = md5_hex(&[
        b"POST",
        b"https://msgapi.umeng.com/api/send",
        body.as_bytes(),
        ANDROID_SECRET.as_bytes(),
    ]);
    assert_eq!(sign, "fe4cbc06048ead98f6a4b4500b081617");
}

fn worked_example_body() -> String {
    let now_secs = (now_ms() / 1000).to_string();
    format!(
        r#"{{"appkey":"5f0000000000000000000001","timestamp":"{now_secs}","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{{"display_type":"notification","body":{{"ticker":"hi","title":"hi","text":"hello","after_open":"go_app"}}}},"production_mode":"false"}}"#
    )
}

#[tokio::test]
async fn worked_example_is_accepted_with_a_uu_msg_id() {
    let sim = spawn_sim().await;
    let body = worked_example_body();
    let sign = sim.sign("/api/send", &body, ANDROID_SECRET);

    let reply = sim
        .post_raw("/api/send", &format!("sign={sign}"), &body)
        .await;

    reply.assert_success();
    let msg_id = reply.data("msg_id");
    assert!(msg_id.starts_with("uu"), "{msg_id}");
    assert_eq!(msg_id.len(), 22);
    assert!(msg_id[2..].bytes().all(|b| b.is_ascii_digit()));
    let recorded = sim.handle.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].body, body);
    assert_eq!(recorded[0].result_id.as_deref(), Some(msg_id.as_str()));
    assert_eq!(recorded[0].cast_type.as_deref(), Some("unicast"));
    assert_eq!(recorded[0].production_mode.as_deref(), Some("false"));
}

#[tokio::test]
async fn wrong_sign_is_2027() {
    let sim = spawn_sim().await;
    let body = worked_example_body();
    // Signed against Umeng's URL instead of the simulator's own base URL.
    let wrong = md5_hex(&[
        b"POST",
        b"https://msgapi.umeng.com/api/send",
        body.as_bytes(),
        ANDROID_SECRET.as_bytes(),
    ]);

    let reply = sim
        .post_raw("/api/send", &format!("sign={wrong}"), &body)
        .await;

    reply.assert_fail("2027");
    assert!(reply.json["data"]["error_msg"].is_string());
}

#[tokio::test]
async fn a_body_re_serialised_after_signing_is_2027() {
    let sim = spawn_sim().await;
    let body = worked_example_body();
    let sign = sim.sign("/api/send", &body, ANDROID_SECRET);
    let pretty = serde_json::to_string_pretty(&serde_json::from_str::<Value>(&body).expect("json"))
        .expect("pretty");

    sim.post_raw("/api/send", &format!("sign={sign}"), &pretty)
        .await
        .assert_fail("2027");
}

#[tokio::test]
async fn missing_sign_is_2007_and_still_recorded() {
    let sim = spawn_sim().await;
    let body = worked_example_body();

    sim.post_raw("/api/send", "", &body)
        .await
        .assert_fail("2007");

    let recorded = sim.handle.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].sign, None);
    assert_eq!(recorded[0].error_code.as_deref(), Some("2007"));
    assert_eq!(recorded[0].http_status, 400);
}

#[tokio::test]
async fn malformed_body_unknown_and_missing_appkey() {
    let sim = spawn_sim().await;
    sim.post_raw("/api/send", "sign=abc", "{not json")
        .await
        .assert_fail("2008");
    sim.post_raw("/api/send", "sign=abc", "[1,2]")
        .await
        .assert_fail("2008");
    sim.post_raw("/api/send", "sign=abc", r#"{"timestamp":"1"}"#)
        .await
        .assert_fail("1000");
    let mut body = unicast(ANDROID_KEY);
    body["appkey"] = json!("nosuchapp");
    sim.send(&body).await.assert_fail("2021");
}

#[tokio::test]
async fn timestamps_stale_malformed_missing_and_accepted_forms() {
    let sim = spawn_sim().await;
    let mut body = unicast(ANDROID_KEY);

    body["timestamp"] = json!((now_ms() - 11 * 60 * 1000).to_string());
    sim.send(&body).await.assert_fail("2028");

    body["timestamp"] = json!((now_ms() + 11 * 60 * 1000).to_string());
    sim.send(&body).await.assert_fail("2028");

    for bad in [json!("17000000001"), json!("now"), json!(12.5), json!("")] {
        body["timestamp"] = bad;
        sim.send(&body).await.assert_fail("2036");
    }

    body.as_object_mut().map(|o| o.remove("timestamp"));
    sim.send(&body).await.assert_fail("2052");

    for good in [
        json!(now_ms() as u64),
        json!((now_ms() / 1000) as u64),
        json!((now_ms() / 1000).to_string()),
    ] {
        body["timestamp"] = good;
        sim.send(&body).await.assert_success();
    }
}

// ---- send rules (§3, §4) ----

#[tokio::test]
async fn listcast_takes_500_tokens_not_501() {
    let sim = spawn_sim().await;
    let tokens = |n: usize| (0..n).map(android_token).collect::<Vec<_>>().join(",");
    let mut body = send_body(ANDROID_KEY, "listcast", true);

    body["device_tokens"] = json!(tokens(501));
    sim.send(&body).await.assert_fail("2015");

    body["device_tokens"] = json!(tokens(500));
    let reply = sim.send(&body).await;
    reply.assert_success();
    assert!(reply.data("msg_id").starts_with("ul"));
}

#[tokio::test]
async fn device_token_rules() {
    let sim = spawn_sim().await;
    let mut body = unicast(ANDROID_KEY);
    body["device_tokens"] = json!(format!("{},{}", android_token(1), android_token(2)));
    sim.send(&body).await.assert_fail("2015");
    body["device_tokens"] = json!("short");
    sim.send(&body).await.assert_fail("4020");
    body.as_object_mut().map(|o| o.remove("device_tokens"));
    sim.send(&body).await.assert_fail("1015");

    let mut ios = unicast(IOS_KEY);
    ios["device_tokens"] = json!(android_token(1));
    sim.send(&ios).await.assert_fail("5005");
}

#[tokio::test]
async fn type_rules() {
    let sim = spawn_sim().await;
    let mut body = unicast(ANDROID_KEY);
    body["type"] = json!("multicast");
    sim.send(&body).await.assert_fail("2048");
    body.as_object_mut().map(|o| o.remove("type"));
    sim.send(&body).await.assert_fail("1016");
}

#[tokio::test]
async fn ios_payload_with_a_d_key_is_5002() {
    let sim = spawn_sim().await;
    let mut body = unicast(IOS_KEY);
    body["payload"]["d"] = json!("x");
    sim.send(&body).await.assert_fail("5002");

    let mut body = unicast(IOS_KEY);
    body["payload"] = json!({"aps": {"sound": "default"}});
    sim.send(&body).await.assert_fail("2025");
    body["payload"] = json!({"aps": {"content-available": 1}});
    sim.send(&body).await.assert_success();
    body["payload"] = json!({"aps": {"alert": "plain string"}, "p2": 1});
    sim.send(&body).await.assert_success();
}

#[tokio::test]
async fn go_url_without_url_is_1022() {
    let sim = spawn_sim().await;
    let mut body = unicast(ANDROID_KEY);
    body["payload"]["body"]["after_open"] = json!("go_url");
    sim.send(&body).await.assert_fail("1022");
    body["payload"]["body"]["url"] = json!("ftp://example.com");
    sim.send(&body).await.assert_fail("1007");
    body["payload"]["body"]["url"] = json!("https://example.com/a");
    sim.send(&body).await.assert_success();
}

#[tokio::test]
async fn android_payload_field_rules() {
    let sim = spawn_sim().await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"body": {"title": "t", "text": "x"}}), "1004"),
        (json!({"display_type": "banner", "body": {}}), "1019"),
        (json!({"display_type": "notification"}), "1002"),
        (json!({"display_type": "message", "body": {}}), "1003"),
        (
            json!({"display_type": "notification", "body": {"text": "x"}}),
            "1009",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t"}}),
            "1010",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t", "text": "x", "after_open": "go_activity"}}),
            "1024",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t", "text": "x", "img": "file:///x"}}),
            "1005",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t", "text": "x", "play_vibrate": true}}),
            "1011",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t", "text": "x", "play_sound": "yes"}}),
            "1013",
        ),
        (
            json!({"display_type": "notification", "body": {"title": "t", "text": "x"}, "extra": "k=v"}),
            "1026",
        ),
        (json!("not an object"), "1001"),
    ];
    for (payload, code) in cases {
        let mut body = unicast(ANDROID_KEY);
        body["payload"] = payload;
        sim.send(&body).await.assert_fail(code);
    }
}

#[tokio::test]
async fn android_payload_of_2048_bytes_passes_and_2049_is_2022() {
    let sim = spawn_sim().await;
    let payload_with =
        |pad: usize| json!({"display_type": "message", "body": {"custom": "x".repeat(pad)}});
    let base = serde_json::to_vec(&payload_with(0)).expect("json").len();
    let at_limit = payload_with(2048 - base);
    assert_eq!(serde_json::to_vec(&at_limit).expect("json").len(), 2048);

    let mut body = unicast(ANDROID_KEY);
    body["payload"] = at_limit;
    sim.send(&body).await.assert_success();

    body["payload"] = payload_with(2049 - base);
    sim.send(&body).await.assert_fail("2022");
}

#[tokio::test]
async fn production_mode_must_be_a_string() {
    let sim = spawn_sim().await;
    let mut body = unicast(ANDROID_KEY);
    body["production_mode"] = json!(true);
    sim.send(&body).await.assert_fail("1017");
    assert_eq!(
        sim.handle.requests()[0].production_mode.as_deref(),
        Some("json:true")
    );
    body["production_mode"] = json!("true");
    sim.send(&body).await.assert_success();
    body.as_object_mut().map(|o| o.remove("production_mode"));
    sim.send(&body).await.assert_success();
    body["mipush"] = json!(false);
    sim.send(&body).await.assert_fail("1017");
}

#[tokio::test]
async fn policy_rules() {
    let sim = spawn_sim().await;
    let beijing = |offset_secs: i64| {
        let t = time::OffsetDateTime::now_utc().to_offset(time::macros::offset!(+8))
            + time::Duration::seconds(offset_secs);
        t.format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]"
        ))
        .expect("format")
    };
    let day = 86_400;
    let cases: Vec<(Value, &str)> = vec![
        (json!("soon"), "1027"),
        (json!({"start_time": "2030/01/01 00:00:00"}), "2039"),
        (json!({"start_time": beijing(-60)}), "2002"),
        (json!({"start_time": beijing(8 * day)}), "2046"),
        (json!({"expire_time": beijing(-60)}), "2003"),
        (
            json!({"start_time": beijing(3600), "expire_time": beijing(1800)}),
            "2003",
        ),
        (json!({"expire_time": beijing(8 * day)}), "2040"),
        (json!({"max_send_num": 999}), "2024"),
    ];
    for (policy, code) in cases {
        let mut body = groupcast(ANDROID_KEY, false);
        body["policy"] = policy;
        sim.send(&body).await.assert_fail(code);
    }
    let mut body = groupcast(ANDROID_KEY, false);
    body["policy"] =
        json!({"start_time": beijing(3600), "expire_time": beijing(2 * day), "max_send_num": 1000});
    let reply = sim.send(&body).await;
    reply.assert_success();
    // A task scheduled in the future reports status 7 until then.
    let status = sim.status(ANDROID_KEY, &reply.data("task_id")).await;
    assert_eq!(status.json["data"]["status"], json!(7));
}

#[tokio::test]
async fn groupcast_filter_rules() {
    let sim = spawn_sim().await;
    let mut body = groupcast(ANDROID_KEY, false);
    body["filter"] = json!({"where": {"or": [{"tag": "a"}]}});
    sim.send(&body).await.assert_fail("2031");
    body["filter"] = json!({"where": {"and": [{"colour": "red"}]}});
    sim.send(&body).await.assert_fail("2031");
    body["filter"] = json!("{\"where\":{}}");
    sim.send(&body).await.assert_fail("2016");
    body.as_object_mut().map(|o| o.remove("filter"));
    sim.send(&body).await.assert_fail("2016");
    body["group_id"] = json!("g1");
    sim.send(&body).await.assert_success();
}

#[tokio::test]
async fn ios_groupcast_needs_a_filter_even_with_a_group_id() {
    // group_id is documented for Android only; iOS requires filter (umeng-api.md §3.1).
    let sim = spawn_sim().await;
    let mut body = groupcast(IOS_KEY, false);
    body.as_object_mut().map(|o| o.remove("filter"));
    body["group_id"] = json!("g1");
    sim.send(&body).await.assert_fail("2016");
    let mut body = groupcast(IOS_KEY, false);
    body["group_id"] = json!("g1");
    sim.send(&body).await.assert_success();
}

#[tokio::test]
async fn customizedcast_rules() {
    let sim = spawn_sim().await;
    let mut body = send_body(ANDROID_KEY, "customizedcast", false);
    body["alias"] = json!("u1");
    sim.send(&body).await.assert_fail("2047");
    body["alias_type"] = json!("uid");
    body.as_object_mut().map(|o| o.remove("alias"));
    sim.send(&body).await.assert_fail("2009");
    body["alias"] = json!("u1");
    body["file_id"] = json!("PF1");
    sim.send(&body).await.assert_fail("2049");
    body.as_object_mut().map(|o| o.remove("file_id"));
    body["alias"] = json!((0..501)
        .map(|i| format!("u{i}"))
        .collect::<Vec<_>>()
        .join(","));
    sim.send(&body).await.assert_fail("2011");
}

#[tokio::test]
async fn every_cast_type_on_every_platform_gets_its_id_prefix() {
    let sim = spawn_sim().await;
    for appkey in [ANDROID_KEY, IOS_KEY] {
        let token = |i| {
            if appkey == IOS_KEY {
                ios_token(i)
            } else {
                android_token(i)
            }
        };
        let upload = sim
            .upload(appkey, &format!("{}\n{}\n", token(1), token(2)))
            .await;
        upload.assert_success();
        let file_id = upload.data("file_id");
        assert!(file_id.starts_with("PF") && file_id[2..].bytes().all(|b| b.is_ascii_digit()));

        let mut cases: Vec<(Value, &str, &str)> = Vec::new();
        let mut b = send_body(appkey, "unicast", false);
        b["device_tokens"] = json!(token(1));
        cases.push((b, "msg_id", "uu"));
        let mut b = send_body(appkey, "listcast", false);
        b["device_tokens"] = json!(format!("{},{}", token(1), token(2)));
        cases.push((b, "msg_id", "ul"));
        let mut b = send_body(appkey, "customizedcast", false);
        b["alias_type"] = json!("uid");
        b["alias"] = json!("u1,u2");
        cases.push((b, "msg_id", "ua"));
        cases.push((send_body(appkey, "broadcast", false), "task_id", "um"));
        cases.push((groupcast(appkey, false), "task_id", "us"));
        let mut b = send_body(appkey, "filecast", false);
        b["file_id"] = json!(file_id);
        cases.push((b, "task_id", "uf"));
        let mut b = send_body(appkey, "customizedcast", false);
        b["alias_type"] = json!("uid");
        b["file_id"] = json!(file_id);
        cases.push((b, "task_id", "uc"));

        for (body, key, prefix) in cases {
            let reply = sim.send(&body).await;
            reply.assert_success();
            let id = reply.data(key);
            assert!(id.starts_with(prefix), "{appkey} {}: {id}", body["type"]);
            assert_eq!(id.len(), 22, "{id}");
        }
    }
}

#[tokio::test]
async fn upload_then_filecast_and_unknown_or_foreign_file_ids() {
    let sim = spawn_sim().await;
    let reply = sim
        .upload(
            ANDROID_KEY,
            &format!("{}\n{}\n", android_token(1), android_token(2)),
        )
        .await;
    reply.assert_success();
    let file_id = reply.data("file_id");

    let mut body = send_body(ANDROID_KEY, "filecast", true);
    body["file_id"] = json!(file_id);
    let sent = sim.send(&body).await;
    sent.assert_success();
    assert!(sent.data("task_id").starts_with("uf"));

    body["file_id"] = json!("PF000000000000000000");
    sim.send(&body).await.assert_fail("2019");
    body.as_object_mut().map(|o| o.remove("file_id"));
    sim.send(&body).await.assert_fail("2018");

    // A file belongs to the appkey that uploaded it.
    let mut ios = send_body(IOS_KEY, "filecast", false);
    ios["file_id"] = json!(file_id);
    sim.send(&ios).await.assert_fail("2019");

    sim.upload(ANDROID_KEY, "").await.assert_fail("2029");
    let no_content = json!({"appkey": ANDROID_KEY, "timestamp": ts()});
    sim.call("/upload", &no_content).await.assert_fail("2029");
}

#[tokio::test]
async fn upload_is_not_under_api() {
    let sim = spawn_sim().await;
    let body = json!({"appkey": ANDROID_KEY, "timestamp": ts(), "content": "a\n"});
    let reply = sim.call("/api/upload", &body).await;
    assert_eq!(reply.status, 404);
    let recorded = sim.handle.requests();
    assert_eq!(recorded[0].path, "/api/upload");
    assert_eq!(recorded[0].http_status, 404);
}

#[tokio::test]
async fn upload_over_the_limit_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = SimulatorConfig {
        apps: vec![format!("{ANDROID_KEY}:{ANDROID_SECRET}:android")
            .parse()
            .expect("app")],
        upload_limit_bytes: 100,
        ..SimulatorConfig::default()
    };
    let sim = Sim {
        handle: simulator::start(listener, config).await.expect("start"),
        client: reqwest::Client::new(),
    };
    sim.upload(ANDROID_KEY, &"a\n".repeat(50))
        .await
        .assert_success();
    sim.upload(ANDROID_KEY, &"a\n".repeat(51))
        .await
        .assert_fail("2038");
}

// ---- quotas (§7) ----

/// Runs `attempt` on fresh simulators until one run stays within one calendar window of
/// `unit` seconds, so that a test never straddles a window edge.
async fn within_one_window<F, Fut>(unit: u64, attempt: F)
where
    F: Fn(Sim) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let window = || (now_ms() / 1000 + 8 * 3600) as u64 / unit;
    for _ in 0..3 {
        let before = window();
        let sim = spawn_sim().await;
        attempt(sim).await;
        if window() == before {
            return;
        }
    }
    panic!("could not stay within one window");
}

#[tokio::test]
async fn broadcast_11_of_the_day_is_2050_and_test_mode_is_not_counted() {
    within_one_window(86_400, |sim| async move {
        for _ in 0..3 {
            sim.send(&send_body(ANDROID_KEY, "broadcast", false))
                .await
                .assert_success();
        }
        for _ in 0..10 {
            sim.send(&send_body(ANDROID_KEY, "broadcast", true))
                .await
                .assert_success();
        }
        sim.send(&send_body(ANDROID_KEY, "broadcast", true))
            .await
            .assert_fail("2050");
        // Test mode stays unlimited; another appkey has its own bucket.
        sim.send(&send_body(ANDROID_KEY, "broadcast", false))
            .await
            .assert_success();
        sim.send(&send_body(IOS_KEY, "broadcast", true))
            .await
            .assert_success();
    })
    .await;
}

#[tokio::test]
async fn groupcast_6_within_a_minute_is_2050() {
    within_one_window(60, |sim| async move {
        for _ in 0..5 {
            sim.send(&groupcast(ANDROID_KEY, true))
                .await
                .assert_success();
        }
        sim.send(&groupcast(ANDROID_KEY, true))
            .await
            .assert_fail("2050");
        // Unicast-class sends have no quota.
        let mut body = unicast(ANDROID_KEY);
        body["production_mode"] = json!("true");
        sim.send(&body).await.assert_success();
    })
    .await;
}

#[tokio::test]
async fn quotas_can_be_switched_off() {
    let sim = spawn_sim_with(Duration::from_millis(100), false).await;
    for _ in 0..7 {
        sim.send(&groupcast(ANDROID_KEY, true))
            .await
            .assert_success();
    }
}

#[tokio::test]
async fn out_biz_no_repeat_returns_the_same_task_id_and_takes_no_quota() {
    within_one_window(60, |sim| async move {
        let mut body = groupcast(ANDROID_KEY, true);
        body["policy"] = json!({"out_biz_no": "order-42"});
        let first = sim.send(&body).await;
        first.assert_success();
        for _ in 0..6 {
            body["timestamp"] = json!(ts());
            let again = sim.send(&body).await;
            again.assert_success();
            assert_eq!(again.data("task_id"), first.data("task_id"));
        }
        // Only one quota slot was used: four more distinct groupcasts fit this minute.
        for _ in 0..4 {
            sim.send(&groupcast(ANDROID_KEY, true))
                .await
                .assert_success();
        }
        sim.send(&groupcast(ANDROID_KEY, true))
            .await
            .assert_fail("2050");
        let recorded = sim.handle.requests();
        assert_eq!(recorded[0].out_biz_no.as_deref(), Some("order-42"));
    })
    .await;
}

// ---- status and cancel (§1.4, §6) ----

#[tokio::test]
async fn task_status_moves_from_queued_to_done() {
    // A step long enough that the first status query surely lands while queued.
    let sim = spawn_sim_with(Duration::from_millis(250), true).await;
    let reply = sim.send(&send_body(ANDROID_KEY, "broadcast", false)).await;
    let task_id = reply.data("task_id");

    let queued = sim.status(ANDROID_KEY, &task_id).await;
    queued.assert_success();
    assert_eq!(queued.json["data"]["status"], json!(0));
    assert_eq!(queued.data("task_id"), task_id);
    assert_eq!(queued.json["data"]["sent_count"], json!(0));

    tokio::time::sleep(Duration::from_millis(550)).await;
    let done = sim.status(ANDROID_KEY, &task_id).await;
    assert_eq!(done.json["data"]["status"], json!(2));
    assert!(done.json["data"]["sent_count"].as_u64().unwrap_or(0) > 0);
    assert!(done.json["data"]["open_count"].is_u64());
    assert!(done.json["data"]["dismiss_count"].is_u64());

    // iOS counters.
    let ios = sim.send(&send_body(IOS_KEY, "broadcast", false)).await;
    tokio::time::sleep(Duration::from_millis(550)).await;
    let status = sim.status(IOS_KEY, &ios.data("task_id")).await;
    assert_eq!(status.json["data"]["status"], json!(2));
    assert!(status.json["data"]["total_count"].as_u64().unwrap_or(0) > 0);
    assert!(status.json["data"]["sent_count"].is_u64());
}

#[tokio::test]
async fn a_filter_matching_nobody_ends_in_status_6() {
    let sim = spawn_sim().await;
    let mut body = groupcast(ANDROID_KEY, false);
    body["filter"] = json!({"where": {"and": [{"tag": "nobody"}]}});
    let task_id = sim.send(&body).await.data("task_id");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let status = sim.status(ANDROID_KEY, &task_id).await;
    assert_eq!(status.json["data"]["status"], json!(6));
}

#[tokio::test]
async fn status_errors() {
    let sim = spawn_sim().await;
    let body = json!({"appkey": ANDROID_KEY, "timestamp": ts()});
    sim.call("/api/status", &body).await.assert_fail("2053");
    sim.status(ANDROID_KEY, "us00000000000000000000")
        .await
        .assert_fail("1014");
    let msg_id = sim.send(&unicast(ANDROID_KEY)).await.data("msg_id");
    sim.status(ANDROID_KEY, &msg_id).await.assert_fail("1014");
    // Another appkey's task is unknown here.
    let task_id = sim
        .send(&send_body(ANDROID_KEY, "broadcast", false))
        .await
        .data("task_id");
    sim.status(IOS_KEY, &task_id).await.assert_fail("1014");
}

#[tokio::test]
async fn cancel_a_queued_task_then_status_is_4() {
    let sim = spawn_sim_with(Duration::from_secs(5), true).await;
    let task_id = sim
        .send(&send_body(ANDROID_KEY, "broadcast", false))
        .await
        .data("task_id");

    let reply = sim.cancel(ANDROID_KEY, &task_id).await;
    reply.assert_success();
    assert_eq!(reply.data("task_id"), task_id);

    let status = sim.status(ANDROID_KEY, &task_id).await;
    assert_eq!(status.json["data"]["status"], json!(4));
    sim.cancel(ANDROID_KEY, &task_id).await.assert_fail("1028");
}

#[tokio::test]
async fn cancel_of_a_unicast_msg_id_or_a_finished_task_fails() {
    let sim = spawn_sim().await;
    let msg_id = sim.send(&unicast(ANDROID_KEY)).await.data("msg_id");
    sim.cancel(ANDROID_KEY, &msg_id).await.assert_fail("1014");

    let task_id = sim
        .send(&send_body(IOS_KEY, "broadcast", false))
        .await
        .data("task_id");
    tokio::time::sleep(Duration::from_millis(150)).await;
    // iOS: sending (1) is no longer cancellable.
    sim.cancel(IOS_KEY, &task_id).await.assert_fail("1028");
}

// ---- faults ----

#[tokio::test]
async fn latency_fault_delays_then_answers() {
    let sim = spawn_sim().await;
    sim.handle.add_fault(Fault {
        appkey: None,
        path: None,
        kind: FaultKind::Latency { ms: 300 },
        times: Some(1),
    });

    let started = Instant::now();
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
    assert!(started.elapsed() >= Duration::from_millis(300));

    let started = Instant::now();
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
    assert!(started.elapsed() < Duration::from_millis(300));
    let recorded = sim.handle.requests();
    assert_eq!(recorded[0].fault.as_deref(), Some("latency(300ms)"));
    assert_eq!(recorded[1].fault, None);
}

#[tokio::test]
async fn hang_fault_never_answers() {
    let sim = spawn_sim().await;
    sim.handle.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".to_owned()),
        kind: FaultKind::Hang,
        times: Some(1),
    });
    let body = unicast(ANDROID_KEY).to_string();
    let sign = sim.sign("/api/send", &body, ANDROID_SECRET);

    let result = sim
        .client
        .post(format!("{}?sign={sign}", sim.url("/api/send")))
        .body(body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;

    assert!(result.as_ref().is_err_and(|e| e.is_timeout()), "{result:?}");
    let recorded = sim.handle.requests();
    assert_eq!(recorded[0].http_status, 0);
    assert_eq!(recorded[0].fault.as_deref(), Some("hang"));
    // Shutdown ends the hung connection too.
    tokio::time::timeout(Duration::from_secs(2), sim.handle.shutdown())
        .await
        .expect("shutdown in time");
}

#[tokio::test]
async fn http_status_fault_gives_a_non_umeng_502() {
    let sim = spawn_sim().await;
    sim.handle.add_fault(Fault {
        appkey: None,
        path: None,
        kind: FaultKind::HttpStatus { status: 502 },
        times: Some(1),
    });

    let reply = sim.send(&unicast(ANDROID_KEY)).await;

    assert_eq!(reply.status, 502);
    assert!(reply.json.is_string(), "not JSON: {}", reply.json);
    assert_eq!(sim.handle.requests()[0].http_status, 502);
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
}

#[tokio::test]
async fn drop_fault_closes_the_connection_without_an_answer() {
    let sim = spawn_sim().await;
    sim.handle.add_fault(Fault {
        appkey: None,
        path: None,
        kind: FaultKind::Drop,
        times: Some(1),
    });
    let body = unicast(ANDROID_KEY).to_string();
    let sign = sim.sign("/api/send", &body, ANDROID_SECRET);

    let result = sim
        .client
        .post(format!("{}?sign={sign}", sim.url("/api/send")))
        .body(body.clone())
        .timeout(Duration::from_secs(5))
        .send()
        .await;

    let err = result.expect_err("the connection must be dropped");
    assert!(!err.is_timeout(), "{err:?}");
    let recorded = sim.handle.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].http_status, 0);
    assert_eq!(recorded[0].fault.as_deref(), Some("drop"));
    // The next request is served normally.
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
}

#[tokio::test]
async fn error_code_fault_answers_a_fail_envelope() {
    let sim = spawn_sim().await;
    sim.handle.add_fault(Fault {
        appkey: None,
        path: None,
        kind: FaultKind::ErrorCode {
            code: "4001".to_owned(),
            message: Some("system busy".to_owned()),
        },
        times: Some(2),
    });

    for _ in 0..2 {
        let reply = sim.send(&unicast(ANDROID_KEY)).await;
        reply.assert_fail("4001");
        assert_eq!(reply.json["data"]["error_msg"], json!("system busy"));
    }
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
    let faults: Vec<_> = sim.handle.requests().into_iter().map(|r| r.fault).collect();
    assert_eq!(
        faults,
        vec![
            Some("error_code(4001)".to_owned()),
            Some("error_code(4001)".to_owned()),
            None
        ]
    );
}

#[tokio::test]
async fn faults_are_scoped_by_appkey_and_path_until_cleared() {
    let sim = spawn_sim().await;
    let fault = |appkey: Option<&str>, path: Option<&str>| Fault {
        appkey: appkey.map(str::to_owned),
        path: path.map(str::to_owned),
        kind: FaultKind::ErrorCode {
            code: "2050".to_owned(),
            message: None,
        },
        times: None,
    };
    sim.handle.add_fault(fault(Some(IOS_KEY), None));
    sim.handle.add_fault(fault(None, Some("/upload")));

    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
    sim.send(&unicast(IOS_KEY)).await.assert_fail("2050");
    sim.send(&unicast(IOS_KEY)).await.assert_fail("2050");
    sim.upload(ANDROID_KEY, "a\n").await.assert_fail("2050");

    sim.handle.clear_faults();
    sim.send(&unicast(IOS_KEY)).await.assert_success();
    sim.upload(ANDROID_KEY, "a\n").await.assert_success();
}

// ---- control endpoints ----

#[tokio::test]
async fn control_endpoints_show_requests_and_manage_faults() {
    let sim = spawn_sim().await;
    let health = sim
        .client
        .get(sim.url("/_sim/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);

    sim.send(&unicast(ANDROID_KEY)).await.assert_success();
    sim.send(&unicast(IOS_KEY)).await.assert_success();

    let all: Vec<simulator::RecordedRequest> = sim
        .client
        .get(sim.url("/_sim/requests"))
        .send()
        .await
        .expect("requests")
        .json()
        .await
        .expect("json");
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].seq, all[1].seq), (1, 2));
    assert_eq!(all[0].path, "/api/send");
    assert!(all[0]
        .result_id
        .as_deref()
        .is_some_and(|id| id.starts_with("uu")));
    assert_eq!(all[0].ret.as_deref(), Some("SUCCESS"));
    assert_eq!(all[0].http_status, 200);

    let ios_only: Vec<Value> = sim
        .client
        .get(sim.url(&format!("/_sim/requests?appkey={IOS_KEY}")))
        .send()
        .await
        .expect("requests")
        .json()
        .await
        .expect("json");
    assert_eq!(ios_only.len(), 1);
    assert_eq!(ios_only[0]["appkey"], json!(IOS_KEY));

    let added = sim
        .client
        .post(sim.url("/_sim/faults"))
        .json(&json!({"path": "/api/send", "kind": {"kind": "http_status", "status": 503}, "times": 1}))
        .send()
        .await
        .expect("add fault");
    assert_eq!(added.status().as_u16(), 201);
    let bad = sim
        .client
        .post(sim.url("/_sim/faults"))
        .json(&json!({"kind": {"kind": "explode"}}))
        .send()
        .await
        .expect("bad fault");
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(sim.send(&unicast(ANDROID_KEY)).await.status, 503);

    sim.client
        .post(sim.url("/_sim/faults"))
        .json(&json!({"kind": {"kind": "drop"}}))
        .send()
        .await
        .expect("add fault");
    let cleared = sim
        .client
        .delete(sim.url("/_sim/faults"))
        .send()
        .await
        .expect("clear faults");
    assert_eq!(cleared.status().as_u16(), 204);
    sim.send(&unicast(ANDROID_KEY)).await.assert_success();

    let cleared = sim
        .client
        .delete(sim.url("/_sim/requests"))
        .send()
        .await
        .expect("clear requests");
    assert_eq!(cleared.status().as_u16(), 204);
    assert!(sim.handle.requests().is_empty());
}

#[tokio::test]
async fn public_url_is_what_clients_sign_against() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = SimulatorConfig {
        apps: vec![format!("{ANDROID_KEY}:{ANDROID_SECRET}:android")
            .parse()
            .expect("app")],
        public_url: Some("https://msgapi.umeng.com/".to_owned()),
        ..SimulatorConfig::default()
    };
    let handle = simulator::start(listener, config).await.expect("start");
    assert_eq!(handle.base_url(), "https://msgapi.umeng.com");
    let body = worked_example_body();
    let sign = md5_hex(&[
        b"POST",
        b"https://msgapi.umeng.com/api/send",
        body.as_bytes(),
        ANDROID_SECRET.as_bytes(),
    ]);
    let res = reqwest::Client::new()
        .post(format!(
            "http://{}/api/send?sign={sign}",
            handle.local_addr()
        ))
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 200);
    handle.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = spawn_sim().await;
    let addr = sim.handle.local_addr();
    sim.handle.clone().shutdown().await;
    let result = reqwest::Client::new()
        .get(format!("http://{addr}/_sim/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(result.is_err());
}
