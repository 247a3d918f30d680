//! The gateway's Umeng client against the real simulator: typed bodies from the model,
//! every cast type on both platforms, every error class, and the transport failures that
//! decide between "never sent" and "outcome unknown".

use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::{json, Map, Value};
use umeng_push_gateway::secret::Secret;
use umeng_push_gateway::simulator::{
    self, Fault, FaultKind, RecordedRequest, SimApp, SimPlatform, SimulatorConfig, SimulatorHandle,
};
use umeng_push_gateway::umeng::model::{
    AfterOpen, AndroidBody, AndroidPayload, Aps, DisplayType, IosAlert, IosAlertFields, IosPayload,
    Payload,
};
use umeng_push_gateway::umeng::{
    self, AppCredentials, CastType, ClientConfig, ErrorClass, Outcome, Platform, SendBody,
    UmengClient, UmengError,
};

use crate::app::{ANDROID_KEY, ANDROID_SECRET, ANDROID_TOKEN, IOS_KEY, IOS_SECRET, IOS_TOKEN};

/// A simulator and a client pointed at it.
struct Env {
    sim: SimulatorHandle,
    client: UmengClient,
}

async fn env_with(task_step: Duration, timeout: Duration) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = simulator::start(
        listener,
        SimulatorConfig {
            apps: vec![
                SimApp {
                    appkey: ANDROID_KEY.into(),
                    secret: ANDROID_SECRET.into(),
                    platform: SimPlatform::Android,
                },
                SimApp {
                    appkey: IOS_KEY.into(),
                    secret: IOS_SECRET.into(),
                    platform: SimPlatform::Ios,
                },
            ],
            task_step,
            ..SimulatorConfig::default()
        },
    )
    .await
    .expect("simulator starts");
    let client = client_for(&sim.base_url(), timeout);
    Env { sim, client }
}

async fn env() -> Env {
    env_with(Duration::from_millis(200), Duration::from_secs(5)).await
}

fn client_for(base_url: &str, timeout: Duration) -> UmengClient {
    UmengClient::new(ClientConfig {
        base_url: base_url.to_owned(),
        connect_timeout: Duration::from_millis(500),
        timeout,
    })
    .expect("client builds")
}

fn creds(platform: Platform) -> AppCredentials {
    let (appkey, secret) = match platform {
        Platform::Android => (ANDROID_KEY, ANDROID_SECRET),
        Platform::Ios => (IOS_KEY, IOS_SECRET),
    };
    AppCredentials {
        appkey: appkey.into(),
        master_secret: Secret::new(secret),
    }
}

fn secret_of(platform: Platform) -> &'static str {
    match platform {
        Platform::Android => ANDROID_SECRET,
        Platform::Ios => IOS_SECRET,
    }
}

fn token(platform: Platform) -> &'static str {
    match platform {
        Platform::Android => ANDROID_TOKEN,
        Platform::Ios => IOS_TOKEN,
    }
}

fn payload(platform: Platform) -> Payload {
    match platform {
        Platform::Android => Payload::Android(AndroidPayload {
            display_type: DisplayType::Notification,
            body: AndroidBody {
                ticker: Some("Order shipped".into()),
                title: Some("Order shipped".into()),
                text: Some("Order 42 is on its way".into()),
                after_open: Some(AfterOpen::GoApp),
                ..Default::default()
            },
            extra: None,
        }),
        Platform::Ios => {
            let mut custom = Map::new();
            custom.insert("order".into(), json!("42"));
            Payload::Ios(IosPayload {
                aps: Aps {
                    alert: Some(IosAlert::Fields(IosAlertFields {
                        title: Some("Order shipped".into()),
                        subtitle: None,
                        body: Some("Order 42 is on its way".into()),
                    })),
                    ..Default::default()
                },
                custom,
            })
        }
    }
}

/// Audience of a send.
#[derive(Debug, Clone, Copy)]
enum Audience {
    Unicast,
    Listcast,
    Broadcast,
    Groupcast,
    Filecast,
    AliasCast,
    AliasFile,
}

impl Audience {
    const ALL: [Audience; 7] = [
        Audience::Unicast,
        Audience::Listcast,
        Audience::Broadcast,
        Audience::Groupcast,
        Audience::Filecast,
        Audience::AliasCast,
        Audience::AliasFile,
    ];

    fn cast_type(self) -> CastType {
        match self {
            Audience::Unicast => CastType::Unicast,
            Audience::Listcast => CastType::Listcast,
            Audience::Broadcast => CastType::Broadcast,
            Audience::Groupcast => CastType::Groupcast,
            Audience::Filecast => CastType::Filecast,
            Audience::AliasCast | Audience::AliasFile => CastType::Customizedcast,
        }
    }

    /// Umeng's id prefix for this kind of send.
    fn prefix(self) -> &'static str {
        match self {
            Audience::Unicast => "uu",
            Audience::Listcast => "ul",
            Audience::AliasCast => "ua",
            Audience::Broadcast => "um",
            Audience::Groupcast => "us",
            Audience::Filecast => "uf",
            Audience::AliasFile => "uc",
        }
    }

    fn is_task(self) -> bool {
        !matches!(
            self,
            Audience::Unicast | Audience::Listcast | Audience::AliasCast
        )
    }
}

/// A test-mode body of `audience` for `platform`; `file_id` for the file-based audiences.
fn body(platform: Platform, audience: Audience, file_id: Option<&str>) -> SendBody {
    let mut b = SendBody::new(audience.cast_type(), payload(platform));
    let t = token(platform);
    match audience {
        Audience::Unicast => b.device_tokens = Some(t.into()),
        Audience::Listcast => b.device_tokens = Some(format!("{t},{t}")),
        Audience::Broadcast => {}
        Audience::Groupcast => {
            b.filter =
                Some(json!({"where": {"and": [{"tag": "vip"}, {"not": {"channel": "360"}}]}}))
        }
        Audience::Filecast => b.file_id = file_id.map(str::to_owned),
        Audience::AliasCast => {
            b.alias_type = Some("user_id".into());
            b.alias = Some("u1,u2".into());
        }
        Audience::AliasFile => {
            b.alias_type = Some("user_id".into());
            b.file_id = file_id.map(str::to_owned);
        }
    }
    b.production_mode = Some(false);
    b.description = Some(format!("{audience:?} on {platform}"));
    b
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Whether the recorded request's `sign` is md5("POST" + url + body + secret) over the
/// exact bytes the simulator received.
fn sign_verifies(sim: &SimulatorHandle, rec: &RecordedRequest, secret: &str) -> bool {
    let url = format!("{}{}", sim.base_url(), rec.path);
    let expected = md5_hex(&[
        b"POST",
        url.as_bytes(),
        rec.body.as_bytes(),
        secret.as_bytes(),
    ]);
    rec.sign.as_deref() == Some(expected.as_str())
}

fn only_send(sim: &SimulatorHandle) -> RecordedRequest {
    let sends: Vec<RecordedRequest> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/send")
        .collect();
    assert_eq!(sends.len(), 1, "{sends:?}");
    sends.into_iter().next().expect("one send")
}

fn unicast(platform: Platform) -> SendBody {
    body(platform, Audience::Unicast, None)
}

fn fault(kind: FaultKind) -> Fault {
    Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind,
        times: Some(1),
    }
}

fn error_code(code: &str) -> FaultKind {
    FaultKind::ErrorCode {
        code: code.into(),
        message: None,
    }
}

/// Sends a test unicast and returns the error it must end in.
async fn send_err(env: &Env, platform: Platform, b: &SendBody) -> UmengError {
    match env.client.send(&creds(platform), b).await.result {
        Ok(ok) => panic!("expected an error, got {ok:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_fail(e: &UmengError, code: &str, class: ErrorClass, outcome: Outcome) {
    match e {
        UmengError::Fail {
            code: got,
            class: got_class,
            http_status,
            ..
        } => {
            assert_eq!(
                (got.as_str(), *got_class, *http_status),
                (code, class, 400),
                "{e}"
            );
            assert_eq!(e.outcome(), outcome, "{e}");
        }
        other => panic!("expected Umeng FAIL {code}, got {other:?}"),
    }
}

// ---- every cast type on both platforms ----

#[tokio::test]
async fn every_cast_type_on_both_platforms_succeeds_with_its_id_prefix_and_a_valid_sign() {
    let env = env().await;
    for platform in [Platform::Android, Platform::Ios] {
        let app = creds(platform);
        let upload_content = match platform {
            Platform::Android => format!("{ANDROID_TOKEN}\n{ANDROID_TOKEN}\n"),
            Platform::Ios => format!("{IOS_TOKEN}\n"),
        };
        let token_file = env
            .client
            .upload(&app, &upload_content)
            .await
            .expect("token upload");
        let alias_file = env
            .client
            .upload(&app, "u1\nu2\nu3\n")
            .await
            .expect("alias upload");
        assert!(token_file.starts_with("PF"), "{token_file}");
        assert!(alias_file.starts_with("PF"), "{alias_file}");

        for audience in Audience::ALL {
            let file_id = match audience {
                Audience::Filecast => Some(token_file.as_str()),
                Audience::AliasFile => Some(alias_file.as_str()),
                _ => None,
            };
            let b = body(platform, audience, file_id);
            assert_eq!(b.is_task_class(), audience.is_task(), "{audience:?}");
            assert!(
                umeng::validate(&b, platform, platform.default_payload_limit(), now()).is_ok(),
                "{audience:?} on {platform} is a valid body"
            );
            env.sim.clear_requests();

            let attempt = env.client.send(&app, &b).await;

            let what = format!("{audience:?} on {platform}");
            let ok = match attempt.result {
                Ok(ok) => ok,
                Err(e) => panic!("{what}: {e}"),
            };
            let id = if audience.is_task() {
                assert_eq!(ok.msg_id, None, "{what}");
                ok.task_id.clone().expect("task_id")
            } else {
                assert_eq!(ok.task_id, None, "{what}");
                ok.msg_id.clone().expect("msg_id")
            };
            assert!(id.starts_with(audience.prefix()), "{what}: {id}");
            assert_eq!(ok.raw["ret"], "SUCCESS", "{what}");

            let rec = only_send(&env.sim);
            assert_eq!(rec.http_status, 200, "{what}");
            assert_eq!(rec.result_id.as_deref(), Some(id.as_str()), "{what}");
            assert_eq!(rec.appkey.as_deref(), Some(app.appkey.as_str()), "{what}");
            assert_eq!(
                rec.cast_type.as_deref(),
                Some(audience.cast_type().as_str())
            );
            assert_eq!(rec.production_mode.as_deref(), Some("false"), "{what}");
            assert!(
                sign_verifies(&env.sim, &rec, secret_of(platform)),
                "{what}: sign"
            );
            // The attempt records what went over the wire, without the sign.
            let wire: Value = serde_json::from_str(&rec.body).expect("recorded body is JSON");
            let sent = attempt.sent_body.expect("sent body");
            assert_eq!(sent.get(), rec.body, "{what}: the exact bytes");
            let sent: Value = serde_json::from_str(sent.get()).expect("sent body is JSON");
            assert_eq!(sent, wire, "{what}");
            assert!(sent.get("sign").is_none());
            assert_eq!(sent["appkey"], app.appkey.as_str());
            let ts = sent["timestamp"].as_str().expect("timestamp is a string");
            assert_eq!(ts.len(), 13, "{ts}");
            assert!(ts.bytes().all(|b| b.is_ascii_digit()), "{ts}");
        }
    }
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

// ---- error classes ----

#[tokio::test]
async fn a_rule_the_simulator_enforces_is_a_client_error() {
    let env = env().await;
    let mut b = unicast(Platform::Android);
    // go_url without a url: local validation would refuse it, the client does not
    // validate, so this checks the simulator's own rule and the client's reading of it.
    if let Payload::Android(p) = &mut b.payload {
        p.body.after_open = Some(AfterOpen::GoUrl);
    }
    assert!(umeng::validate(&b, Platform::Android, 2048, now()).is_err());

    let e = send_err(&env, Platform::Android, &b).await;

    assert_fail(&e, "1022", ErrorClass::Client, Outcome::Rejected);
    assert!(!e.is_retryable());
    assert!(e.is_definite_failure());
    assert_eq!(only_send(&env.sim).error_code.as_deref(), Some("1022"));
}

#[tokio::test]
async fn raw_extra_fields_that_break_a_rule_are_a_client_error() {
    let env = env().await;
    let mut b = unicast(Platform::Ios);
    b.extra_fields = json!({"payload": {"d": "reserved"}})
        .as_object()
        .cloned()
        .expect("object");

    let e = send_err(&env, Platform::Ios, &b).await;

    assert_fail(&e, "5002", ErrorClass::Client, Outcome::Rejected);
}

#[tokio::test]
async fn an_injected_1001_is_a_client_error() {
    let env = env().await;
    env.sim.add_fault(fault(error_code("1001")));

    let e = send_err(&env, Platform::Android, &unicast(Platform::Android)).await;

    assert_fail(&e, "1001", ErrorClass::Client, Outcome::Rejected);
}

/// Days since the epoch in Beijing time.
fn beijing_day() -> i64 {
    (now().unix_timestamp() + 8 * 3600).div_euclid(86_400)
}

#[tokio::test]
async fn broadcast_11_of_the_day_in_production_is_quota() {
    let env = env().await;
    let day = beijing_day();
    let mut b = body(Platform::Android, Audience::Broadcast, None);
    b.production_mode = Some(true);
    for i in 0..10 {
        let attempt = env.client.send(&creds(Platform::Android), &b).await;
        assert!(attempt.result.is_ok(), "broadcast {}", i + 1);
    }

    let e = send_err(&env, Platform::Android, &b).await;

    if beijing_day() != day {
        eprintln!("the Beijing day changed during the test; quota window reset");
        return;
    }
    assert_fail(&e, "2050", ErrorClass::Quota, Outcome::Rejected);
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn an_injected_2050_is_quota() {
    let env = env().await;
    env.sim.add_fault(fault(error_code("2050")));

    let e = send_err(&env, Platform::Ios, &unicast(Platform::Ios)).await;

    assert_fail(&e, "2050", ErrorClass::Quota, Outcome::Rejected);
}

#[tokio::test]
async fn a_wrong_master_secret_is_auth_2027() {
    let env = env().await;
    let wrong = AppCredentials {
        appkey: ANDROID_KEY.into(),
        master_secret: Secret::new("wrongsecret0123456789abcdefghijk"),
    };

    let e = match env
        .client
        .send(&wrong, &unicast(Platform::Android))
        .await
        .result
    {
        Ok(ok) => panic!("expected 2027, got {ok:?}"),
        Err(e) => e,
    };

    assert_fail(&e, "2027", ErrorClass::Auth, Outcome::Rejected);
    assert_eq!(e.metric_label(), "auth");
}

#[tokio::test]
async fn an_injected_2034_is_certificate() {
    let env = env().await;
    env.sim.add_fault(fault(error_code("2034")));

    let e = send_err(&env, Platform::Ios, &unicast(Platform::Ios)).await;

    assert_fail(&e, "2034", ErrorClass::Certificate, Outcome::Rejected);
}

#[tokio::test]
async fn an_injected_6003_is_retryable_with_an_unknown_outcome() {
    let env = env().await;
    env.sim.add_fault(fault(error_code("6003")));

    let e = send_err(&env, Platform::Android, &unicast(Platform::Android)).await;

    assert_fail(&e, "6003", ErrorClass::Retryable, Outcome::Unknown);
    assert!(e.is_retryable());
    assert!(!e.is_definite_failure());
}

// ---- transport failures ----

#[track_caller]
fn assert_unknown(e: &UmengError) {
    assert!(matches!(e, UmengError::Unknown { .. }), "{e:?}");
    assert_eq!(e.outcome(), Outcome::Unknown);
    assert_eq!(e.code(), None);
}

#[tokio::test]
async fn a_hang_longer_than_the_timeout_is_unknown() {
    let env = env_with(Duration::from_millis(200), Duration::from_millis(300)).await;
    env.sim.add_fault(fault(FaultKind::Hang));
    let started = Instant::now();

    let attempt = env
        .client
        .send(&creds(Platform::Android), &unicast(Platform::Android))
        .await;

    let e = attempt.result.expect_err("a hang cannot succeed");
    assert_unknown(&e);
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(attempt.latency >= Duration::from_millis(300));
    // The request did reach the simulator: that is why the outcome is unknown.
    let rec = only_send(&env.sim);
    assert_eq!(rec.fault.as_deref(), Some("hang"));
    assert!(attempt.sent_body.is_some());
}

#[tokio::test]
async fn a_dropped_connection_is_unknown() {
    let env = env().await;
    env.sim.add_fault(fault(FaultKind::Drop));

    let e = send_err(&env, Platform::Ios, &unicast(Platform::Ios)).await;

    assert_unknown(&e);
    assert_eq!(only_send(&env.sim).fault.as_deref(), Some("drop"));
}

#[tokio::test]
async fn an_http_502_is_unknown() {
    let env = env().await;
    env.sim
        .add_fault(fault(FaultKind::HttpStatus { status: 502 }));

    let e = send_err(&env, Platform::Android, &unicast(Platform::Android)).await;

    assert_unknown(&e);
    assert!(e.to_string().contains("HTTP 502"), "{e}");
}

#[tokio::test]
async fn a_closed_port_is_not_sent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = client_for(&format!("http://{addr}"), Duration::from_secs(2));

    let attempt = client
        .send(&creds(Platform::Android), &unicast(Platform::Android))
        .await;

    let e = attempt.result.expect_err("nothing listens there");
    assert!(matches!(e, UmengError::NotSent { .. }), "{e:?}");
    assert_eq!(e.outcome(), Outcome::NotSent);
    assert!(e.is_definite_failure());
    assert!(e.is_retryable());
}

// ---- tasks: status and cancel ----

/// Polls `/api/status` until `want` (or panics after `limit`).
async fn wait_for_status(env: &Env, platform: Platform, task_id: &str, want: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = env
            .client
            .status(&creds(platform), task_id)
            .await
            .expect("status");
        if status.status == want {
            return status.raw;
        }
        assert!(
            Instant::now() < deadline,
            "task {task_id} still in status {} (want {want})",
            status.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send_broadcast(env: &Env, platform: Platform) -> String {
    let ok = env
        .client
        .send(&creds(platform), &body(platform, Audience::Broadcast, None))
        .await
        .result
        .expect("broadcast accepted");
    ok.task_id.expect("task_id")
}

#[tokio::test]
async fn task_status_moves_from_queued_to_done() {
    let env = env_with(Duration::from_millis(300), Duration::from_secs(5)).await;
    let task_id = send_broadcast(&env, Platform::Android).await;

    let queued = env
        .client
        .status(&creds(Platform::Android), &task_id)
        .await
        .expect("status");

    assert_eq!(queued.status, 0, "{}", queued.raw);
    assert_eq!(queued.raw["data"]["task_id"], task_id.as_str());
    let done = wait_for_status(&env, Platform::Android, &task_id, 2).await;
    assert!(
        done["data"]["sent_count"].as_u64().unwrap_or(0) > 0,
        "{done}"
    );
    let status_calls: Vec<RecordedRequest> = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/status")
        .collect();
    assert!(status_calls
        .iter()
        .all(|r| sign_verifies(&env.sim, r, ANDROID_SECRET)));
}

#[tokio::test]
async fn a_queued_task_can_be_cancelled() {
    let env = env_with(Duration::from_secs(10), Duration::from_secs(5)).await;
    let task_id = send_broadcast(&env, Platform::Ios).await;

    env.client
        .cancel(&creds(Platform::Ios), &task_id)
        .await
        .expect("cancel of a queued task");

    let status = env
        .client
        .status(&creds(Platform::Ios), &task_id)
        .await
        .expect("status");
    assert_eq!(status.status, 4, "{}", status.raw);
}

#[tokio::test]
async fn cancelling_a_finished_task_fails_with_1028() {
    let env = env_with(Duration::from_millis(50), Duration::from_secs(5)).await;
    let task_id = send_broadcast(&env, Platform::Android).await;
    wait_for_status(&env, Platform::Android, &task_id, 2).await;

    let e = env
        .client
        .cancel(&creds(Platform::Android), &task_id)
        .await
        .expect_err("a finished task cannot be cancelled");

    assert_fail(&e, "1028", ErrorClass::Client, Outcome::Rejected);
}

// ---- secrets ----

#[tokio::test]
async fn error_texts_never_contain_the_secret_or_the_sign() {
    let env = env_with(Duration::from_millis(200), Duration::from_millis(300)).await;
    let app = creds(Platform::Android);
    let b = unicast(Platform::Android);
    let mut errors = Vec::new();
    // Wrong secret (2027), then one of each fault, then a closed port.
    let wrong = AppCredentials {
        appkey: ANDROID_KEY.into(),
        master_secret: Secret::new("wrongsecret0123456789abcdefghijk"),
    };
    errors.push(env.client.send(&wrong, &b).await.result.expect_err("2027"));
    for kind in [
        error_code("2034"),
        FaultKind::Hang,
        FaultKind::Drop,
        FaultKind::HttpStatus { status: 502 },
    ] {
        env.sim.add_fault(fault(kind));
        errors.push(env.client.send(&app, &b).await.result.expect_err("fault"));
    }
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/status".into()),
        kind: FaultKind::Drop,
        times: Some(1),
    });
    errors.push(
        env.client
            .status(&app, "um00000000000000000000")
            .await
            .expect_err("status dropped"),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    errors.push(
        client_for(&closed, Duration::from_secs(1))
            .send(&app, &b)
            .await
            .result
            .expect_err("closed port"),
    );
    let signs: Vec<String> = env
        .sim
        .requests()
        .into_iter()
        .filter_map(|r| r.sign)
        .collect();
    assert_eq!(signs.len(), 6, "every request reached the simulator signed");

    for e in &errors {
        let texts = [e.to_string(), format!("{e:?}")];
        for text in &texts {
            assert!(!text.contains(ANDROID_SECRET), "secret in {text}");
            assert!(!text.contains("wrongsecret"), "secret in {text}");
            assert!(!text.contains("sign="), "signed URL in {text}");
            for sign in &signs {
                assert!(!text.contains(sign.as_str()), "sign in {text}");
            }
        }
    }
    // Credentials' Debug output hides the secret too.
    assert!(!format!("{app:?}").contains(ANDROID_SECRET));
}
